"""Bad batch input gets a clear error, before anything runs, and nothing is charged.

Every refusal comes from the upload or the creation's checks and quote;
only the last test's one-line batch runs.
"""

from __future__ import annotations

import io
import socket

import time

import httpx
import openai
import pytest

from tests.batch_helpers import batch_home, jsonl, mixed_lines
from tests.conftest import Service
from tests.service_helpers import openai_client, served
from tpm_fed.batches.jsonl import read_batch_file
from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.protocol import MAX_FILE_BYTES
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.errors import PayloadTooLarge

GRANT_SU = 2.0
"""Enough for a few lines' bounds (each counts a 0.5 SU cold start), not for a long batch."""


@pytest.fixture(scope="module")
def small_assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(batch_home(tmp_path_factory.mktemp("batch-errors"), demo_model_dir, grant_su=GRANT_SU)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def small_runtime(small_assembly):
    return small_assembly.engine


@pytest.fixture(scope="module")
def owner_service(small_assembly):
    with served(small_assembly) as (url, token):
        yield Service(url, token, None)


@pytest.fixture(scope="module")
def stranger_service(small_assembly):
    """The same runtime and batches, reached by another identity."""
    with served(small_assembly, "someone-else@example.org") as (url, token):
        yield Service(url, token, None)


@pytest.fixture(scope="module")
def client(owner_service):
    return openai_client(owner_service.url, owner_service.token)


@pytest.fixture(scope="module")
def stranger(stranger_service):
    return openai_client(stranger_service.url, stranger_service.token)


def _books(runtime):
    return [(b.spent_usu, b.reserved_usu) for b in runtime.ledger.balances()], len(runtime.ledger.statement())


def _upload(client, lines) -> str:
    return client.files.create(file=("batch.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id


def test_every_bad_line_is_named_with_its_number_and_nothing_is_stored(client, small_runtime):
    good = mixed_lines(2)
    lines = [
        good[0],
        "{not json",
        "[1, 2]",
        {"method": "POST", "url": "/v1/completions", "body": {"model": DEMO_MODEL_NAME, "prompt": "x"}},
        {"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions",
         "body": {"model": DEMO_MODEL_NAME, "prompt": "x", "max_tokens": -1}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"model": DEMO_MODEL_NAME, "prompt": "x", "temprature": 0}},
        {"custom_id": "d", "method": "POST", "url": "/v1/completions",
         "body": {"model": DEMO_MODEL_NAME, "prompt": "x", "stream": True}},
        {**good[1], "custom_id": good[0]["custom_id"]},
        {"custom_id": "e", "method": "GET", "url": "/v1/embeddings", "body": {"model": DEMO_MODEL_NAME, "input": "x"}},
        {"custom_id": "f", "method": "POST", "url": "/v1/embeddings", "body": {"model": DEMO_MODEL_NAME, "input": []}},
    ]
    before = _books(small_runtime)
    with pytest.raises(openai.BadRequestError) as refused:
        _upload(client, lines)
    message = refused.value.body["message"]
    assert "the batch file has 10 bad lines" in message
    for number, words in [(2, "not valid JSON"), (3, "JSON object"), (4, "custom_id: Field required"),
                          (5, "/v1/images/generations"), (6, "max_tokens"), (7, "temprature: unknown parameter"),
                          (8, "stream"), (9, "repeats line 1"), (10, "method"), (11, "input must not be empty")]:
        assert f"line {number}: " in message and words in message.split(f"line {number}: ")[1].split("; line")[0]
    assert "line 1:" not in message
    assert _books(small_runtime) == before


def test_a_file_over_the_limit_is_refused_before_it_is_read(owner_service):
    with pytest.raises(PayloadTooLarge, match="104,857,600"):
        read_batch_file(b"x" * (MAX_FILE_BYTES + 1), LineRoutes({}))  # refused before any line is parsed
    # Over HTTP: refused from its declared length, before a byte of the body is sent.
    host, port = owner_service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {owner_service.token}\r\n"
                    f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {MAX_FILE_BYTES * 2}\r\n\r\n"
                    .encode())
        answer = b""
        while chunk := raw.recv(4096):  # the service closes the connection after its answer
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "PayloadTooLarge" in answer


def test_an_empty_file_a_wrong_purpose_and_a_bad_create_body_are_refused(client, owner_service):
    with pytest.raises(openai.BadRequestError, match="holds no lines"):
        client.files.create(file=("empty.jsonl", io.BytesIO(b"\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(jsonl(mixed_lines(1)))), purpose="fine-tune")
    file_id = _upload(client, mixed_lines(1))
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="colour: unknown parameter"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                              extra_body={"colour": "blue"})


def test_lines_the_service_would_refuse_are_refused_at_creation_by_line(client, small_runtime):
    lines = mixed_lines(3, routes=("/v1/completions",))
    lines[1]["body"]["model"] = "no-such-model"
    lines[2]["body"]["model"] = "also-missing"
    before = _books(small_runtime)
    with pytest.raises(openai.NotFoundError) as refused:  # one cause for every bad line: its own status
        client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/completions",
                              completion_window="24h")
    assert "line 2: line-1: UnknownModel" in refused.value.body["message"]
    assert "line 3: line-2: UnknownModel" in refused.value.body["message"]
    chat = mixed_lines(2, routes=("/v1/chat/completions",))
    chat[1]["body"]["model"] = DEMO_MODEL_NAME  # a model without a chat template
    with pytest.raises(openai.BadRequestError, match="line 2: line-1: .*chat template"):
        client.batches.create(input_file_id=_upload(client, chat), endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.PermissionDeniedError, match="not a member of project 'not-mine'"):
        client.batches.create(input_file_id=_upload(client, mixed_lines(1)), endpoint="/v1/completions",
                              completion_window="24h", extra_body={"project": "not-mine"})
    assert _books(small_runtime) == before
    assert client.batches.list().data == []


def test_a_batch_over_the_balance_is_refused_with_its_quote(client, owner_service, small_runtime):
    lines = mixed_lines(12, routes=("/v1/completions",), tokens=64)
    file_id = _upload(client, lines)
    with httpx.Client(base_url=owner_service.url, headers=owner_service.headers) as http:
        quote = http.post("/v1/quotes", json={"input_file_id": file_id}).json()
        one = http.post("/v1/quotes", json={"body": lines[0]["body"]}).json()
    assert quote["object"] == "batch.quote" and quote["lines"] == 12 and quote["project"] == "batches"
    assert one["object"] == "quote" and one["kind"] == "generate"
    # The lines share replicas: one line's bound counts a cold start (0.5 SU by default), the batch's
    # counts as many as the site may start (two here), not twelve.
    cold_su = 0.5
    assert quote["max_su"] == pytest.approx(12 * (one["max_su"] - cold_su) + 2 * cold_su, rel=0.05)
    assert quote["max_su"] > GRANT_SU and quote["available_su"] == {"local": GRANT_SU}
    before = _books(small_runtime)
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert refused.value.code == "insufficient_quota"
    assert f"at most {quote['max_su']:.6f} SU" in refused.value.body["message"]
    assert "Nothing was run or charged" in refused.value.body["message"]
    assert _books(small_runtime) == before and client.batches.list().data == []


def test_another_users_files_and_batches_are_not_theirs(client, stranger, stranger_service):
    file_id = _upload(client, mixed_lines(1, routes=("/v1/embeddings",)))
    for attempt in (lambda: stranger.files.retrieve(file_id), lambda: stranger.files.content(file_id),
                    lambda: stranger.batches.retrieve("batch_0000"), lambda: stranger.batches.cancel("batch_0000"),
                    lambda: stranger.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                                    completion_window="24h")):
        with pytest.raises(openai.PermissionDeniedError):
            attempt()
    # Created by its owner: the stranger can neither read it, nor cancel it, nor read its results.
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    for attempt in (lambda: stranger.batches.retrieve(batch.id), lambda: stranger.batches.cancel(batch.id)):
        with pytest.raises(openai.PermissionDeniedError, match="of yours"):
            attempt()
    results = httpx.get(f"{stranger_service.url}/tpm/v1/batches/{batch.id}/results",
                        headers=stranger_service.headers)
    assert results.status_code == 403 and results.json()["error"]["code"] == "NotPermitted"
    asked = time.monotonic()  # the long poll reads the batch (theirs?) before it waits
    held = httpx.get(f"{stranger_service.url}/v1/batches/{batch.id}", params={"wait": 5},
                     headers=stranger_service.headers)
    assert held.status_code == 403 and held.json()["error"]["code"] == "NotPermitted"
    assert time.monotonic() - asked < 2.5
    assert stranger.batches.list().data == []
    assert [b.id for b in client.batches.list().data] == [batch.id]
