"""Bad input to vector stores: a clear error (OpenAI's error body), nothing charged, nothing half-ingested.

Uploads a store cannot read are refused at ``/v1/files`` (unsupported, empty, not UTF-8, a corrupt PDF, over
the limit), storing nothing. A file that reaches a store and fails there is marked ``failed`` with OpenAI's
``last_error`` and leaves the store's previous snapshot current and its search unchanged. A query over the
embedding model's context, a filter on an attribute no file has, and a file batch the project cannot pay for
are refused before anything is charged.
"""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from tests.conftest import Service
from tests.service_helpers import openai_client as official_client
from tests.service_helpers import served
from tests.store_helpers import OUTSIDER, store_home, upload, wait_until_done

GOOD = "The cell divides when its copy of the genome is complete."


@pytest.fixture(scope="module")
def assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(store_home(tmp_path_factory.mktemp("store-bad"), demo_model_dir, others_su=0.01)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def runtime(assembly):
    return assembly.engine


@pytest.fixture(scope="module")
def service(assembly):
    with served(assembly) as (url, token):
        yield Service(url, token, None)


@pytest.fixture(scope="module")
def client(service):
    return official_client(service.url, service.token)


@pytest.fixture(scope="module")
def store(client):
    file_id = upload(client, "cells.txt", GOOD)
    created = client.vector_stores.create(name="cells", file_ids=[file_id],
                                          chunking_strategy={"type": "static", "static": {
                                              "max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}})
    client.vector_stores.files.update(file_id, vector_store_id=created.id, attributes={"year": 2024, "lab": "a"})
    wait_until_done(client, created.id)
    return created.id


def charged_rows(runtime) -> int:
    return len(runtime.ledger.statement("science"))


@pytest.mark.parametrize(("name", "data", "status", "words"), [
    ("notes.docx", b"PK\x03\x04 a word file", 400, "not .docx"),
    ("empty.txt", b"", 400, "holds no text"),
    ("blank.md", b"  \n\n  ", 400, "holds no text"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), 400, "not UTF-8"),
    ("broken.pdf", b"%PDF-1.4\n this is not a pdf body", 400, "not a readable PDF"),
    ("lines.jsonl", b'{"text": "fine"}\n{not json\n', 400, "line 2: not JSON"),
])
def test_an_upload_a_store_cannot_read_is_refused_and_nothing_is_stored(client, name, data, status, words):
    before = {f.id for f in client.files.list()}
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=(name, io.BytesIO(data)), purpose="assistants")
    assert refused.value.status_code == status and words in refused.value.message
    assert {f.id for f in client.files.list()} == before


def test_an_upload_over_the_limit_is_refused_413(client, monkeypatch):
    import tpm_fed.stores.documents as documents

    monkeypatch.setattr(documents, "MAX_DOCUMENT_BYTES", 1000)
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("big.txt", io.BytesIO(b"word " * 300)), purpose="assistants")
    assert refused.value.status_code == 413


def test_a_failed_file_leaves_the_previous_snapshot_current_and_costs_nothing(client, store, runtime, service):
    before = client.vector_stores.retrieve(store).model_extra["tpm"]["snapshot"]
    hits_before = [h.content[0].text for h in client.vector_stores.search(store, query="genome")]
    charges_before = _get(service, f"/tpm/v1/vector_stores/{store}/charges")["by_cause"]["ingest"]
    # A batch input file is a store's to read only if its kind is: this one (a .docx name) is not.
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "demo-llama", "prompt": "x"}}
    odd = client.files.create(file=("notes.docx", io.BytesIO(json.dumps(line).encode())), purpose="batch").id
    client.vector_stores.files.create(store, file_id=odd)
    wait_until_done(client, store)
    failed = client.vector_stores.files.retrieve(odd, vector_store_id=store)
    assert failed.status == "failed" and failed.last_error.code == "unsupported_file"
    assert ".docx" in failed.last_error.message
    assert client.vector_stores.retrieve(store).model_extra["tpm"]["snapshot"] == before
    assert [h.content[0].text for h in client.vector_stores.search(store, query="genome")] == hits_before
    assert _get(service, f"/tpm/v1/vector_stores/{store}/charges")["by_cause"]["ingest"] == charges_before


def test_a_query_over_the_embedding_models_context_is_refused_uncharged(client, store, runtime):
    rows = charged_rows(runtime)
    with pytest.raises(openai.BadRequestError) as refused:
        client.vector_stores.search(store, query="genome " * 400)
    assert "the store's embedding model takes at most" in refused.value.message
    assert charged_rows(runtime) == rows


def test_a_filter_on_an_unknown_attribute_is_refused_uncharged(client, store, runtime):
    rows = charged_rows(runtime)
    with pytest.raises(openai.BadRequestError) as refused:
        client.vector_stores.search(store, query="genome", filters={"key": "yeer", "type": "eq", "value": 2024})
    assert "'yeer'" in refused.value.message and "'year'" in refused.value.message
    assert charged_rows(runtime) == rows
    kept = client.vector_stores.search(store, query="genome", filters={"key": "year", "type": "gte", "value": 2024})
    dropped = client.vector_stores.search(store, query="genome", filters={
        "type": "and", "filters": [{"key": "year", "type": "gte", "value": 2024}, {"key": "lab", "type": "ne", "value": "a"}]})
    assert [h.content[0].text for h in kept] == [GOOD] and list(dropped) == []


@pytest.mark.parametrize("body", [{"query": "x", "max_num_results": 51}, {"query": "x", "max_num_results": 0},
                                  {"query": ""}, {"query": "x", "filters": {"key": "a", "type": "in", "value": 1}}])
def test_a_search_body_out_of_bounds_is_refused(service, store, body):
    answer = httpx.post(f"{service.url}/v1/vector_stores/{store}/search", json=body, headers=service.headers)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"


def test_chunks_over_the_embedding_models_context_are_refused_and_no_store_is_made(client):
    before = {s.id for s in client.vector_stores.list()}
    with pytest.raises(openai.BadRequestError) as refused:
        client.vector_stores.create(name="too big", chunking_strategy={"type": "static", "static": {
            "max_chunk_size_tokens": 4096, "chunk_overlap_tokens": 0}})
    assert "over the store's embedding model's context" in refused.value.message
    assert {s.id for s in client.vector_stores.list()} == before


def test_another_callers_upload_cannot_be_attached(client, store, assembly):
    with served(assembly, OUTSIDER) as (url, token):
        theirs = upload(official_client(url, token), "theirs.txt", "Their private notes.")
    with pytest.raises(openai.PermissionDeniedError):
        client.vector_stores.files.create(store, file_id=theirs)
    assert theirs not in {f.id for f in client.vector_stores.files.list(store)}


def test_a_file_batch_the_project_cannot_pay_for_is_refused_before_it_runs(assembly, runtime):
    with served(assembly, OUTSIDER) as (url, token):  # project 'others' holds 0.01 SU
        poor = official_client(url, token)
        file_id = upload(poor, "long.txt", " ".join(f"sentence {i} about cells and rivers." for i in range(300)))
        rows = len(runtime.ledger.statement("others"))
        with pytest.raises(openai.RateLimitError) as refused:
            poor.vector_stores.create(name="unpaid", file_ids=[file_id])
        assert "cannot pay for embedding" in refused.value.message and "Nothing was queued" in refused.value.message
        assert list(poor.vector_stores.list()) == [] and len(runtime.ledger.statement("others")) == rows


def _get(service: Service, path: str) -> dict:
    answer = httpx.get(f"{service.url}{path}", headers=service.headers, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_expired_store_says_so_and_is_not_searched(client, runtime):
    from sqlalchemy import update

    from tpm_fed.stores.tables import vector_stores_table as stores

    file_id = upload(client, "cells.txt", GOOD)
    made = client.vector_stores.create(name="short-lived", file_ids=[file_id],
                                       expires_after={"anchor": "last_active_at", "days": 1})
    done = wait_until_done(client, made.id)
    assert done.expires_at == done.last_active_at + 86400 and done.expires_after.days == 1
    with runtime.ledger.engine.begin() as db:  # two days unused
        db.execute(update(stores).where(stores.c.store_id == made.id).values(last_active_at=done.last_active_at - 2 * 86400))
    assert client.vector_stores.retrieve(made.id).status == "expired"
    rows = charged_rows(runtime)
    with pytest.raises(openai.BadRequestError, match="expired"):
        client.vector_stores.search(made.id, query="genome")
    assert charged_rows(runtime) == rows
