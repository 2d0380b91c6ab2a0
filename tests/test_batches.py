"""Batches in OpenAI's format, driven by the official ``openai`` client against the session's real service.

Every line's answer is compared with the same body sent alone to its route
(greedy, so the texts must be equal), and every line's charge with the
ledger's own rows.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest

from tests.batch_helpers import batch_home, jsonl, mixed_lines, read_jsonl, wait_for
from tests.conftest import Service
from tests.service_helpers import openai_client as official_client
from tests.service_helpers import served
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.state.schema import MICRO


@pytest.fixture(scope="module")
def batch_assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(batch_home(tmp_path_factory.mktemp("batch-home"), demo_model_dir)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def batch_runtime(batch_assembly):
    return batch_assembly.engine


@pytest.fixture(scope="module")
def batch_service(batch_assembly):
    with served(batch_assembly) as (url, token):
        yield Service(url, token, None)


@pytest.fixture(scope="module")
def openai_client(batch_service):
    return official_client(batch_service.url, batch_service.token)


def same_answer(route: str, batched: dict, alone: dict) -> None:
    """What must be equal between a line's answer and the same body's answer alone (ids and charges differ)."""
    if route == "/v1/embeddings":
        for mine, theirs in zip(batched["data"], alone["data"], strict=True):
            assert mine["embedding"] == pytest.approx(theirs["embedding"], abs=1e-4)
    elif route == "/tpm/v1/requests":  # a trace: its generated text and its lens, bit for bit
        assert batched["completions"] == alone["completions"] and batched["tensors_blob"] == alone["tensors_blob"]
        assert batched["version"] == alone["version"] and batched["usage"] == alone["usage"]
        return
    else:
        assert batched["choices"] == alone["choices"]
    assert batched["usage"] == alone["usage"]
    assert batched["model"] == alone["model"] and batched["tpm"]["version"] == alone["tpm"]["version"]


def test_a_mixed_batch_answers_every_line_as_its_route_would_alone(openai_client, batch_service, batch_runtime):
    lines = mixed_lines(200, routes=("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tpm/v1/requests"))
    uploaded = openai_client.files.create(file=("mixed.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert openai_client.files.retrieve(uploaded.id).filename == "mixed.jsonl"
    assert openai_client.files.content(uploaded.id).content == jsonl(lines)

    created = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                           completion_window="24h", metadata={"purpose": "test"},
                                           extra_body={"project": "batches"})
    assert created.status == "in_progress" and created.request_counts.total == 200
    assert created.metadata == {"purpose": "test"}
    quote = created.model_extra["tpm"]["quote"]
    assert quote["lines"] == 200 and quote["max_su"] > 0

    batch = wait_for(openai_client, created.id)
    assert batch.status == "completed"
    assert batch.error_file_id is None, openai_client.files.content(batch.error_file_id).content[:3000]
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (200, 200, 0)
    assert batch.id in {b.id for b in openai_client.batches.list(limit=100).data}

    output = read_jsonl(openai_client.files.content(batch.output_file_id).content)
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]  # input order
    with httpx.Client(base_url=batch_service.url, headers=batch_service.headers, timeout=120) as http:
        for line, answer in zip(lines, output, strict=True):
            assert answer["error"] is None and answer["response"]["status_code"] == 200
            alone = http.post(line["url"], json=line["body"])
            assert alone.status_code == 200, alone.text
            same_answer(line["url"], answer["response"]["body"], alone.json())
            body = answer["response"]["body"]
            assert answer["response"]["request_id"] == (body["request_id"] if "kind" in line["body"]
                                                        else body["tpm"]["request_id"])

    # Every line's charge is the ledger's: one settled row each, and the batch's total is their sum.
    charges = {c.request_id: c for c in batch_runtime.ledger.statement("batches")}
    ids = [answer["response"]["request_id"] for answer in output]
    assert all(charges[rid].state == "settled" for rid in ids)
    total_usu = sum(charges[rid].charged_usu for rid in ids)
    assert batch.model_extra["tpm"]["charged_su"] == pytest.approx(total_usu / MICRO)
    assert total_usu / MICRO <= quote["max_su"]  # the quote bounds the charge
    assert batch.usage.input_tokens == sum(a["response"]["body"]["usage"]["prompt_tokens"] for a in output)
    assert sum(1 for line in lines if line["url"] == "/tpm/v1/requests") == 50  # traces are a quarter of it


def test_the_native_route_runs_traces_in_a_batch(openai_client, batch_service):
    """``/tpm/v1/requests`` lines: any kind in its wire form; the answer is the result's wire form."""
    lines = [{"custom_id": f"trace-{i}", "method": "POST", "url": "/tpm/v1/requests",
              "body": {"kind": "trace", "model": {"name": DEMO_MODEL_NAME}, "prompts": [f"The cell {i}"],
                       "max_new_tokens": 3, "logit_lens": {"top_k": 2}}} for i in range(3)]
    uploaded = openai_client.files.create(file=("native.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = wait_for(openai_client, openai_client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h").id)
    assert batch.request_counts.completed == 3
    output = read_jsonl(openai_client.files.content(batch.output_file_id).content)
    with httpx.Client(base_url=batch_service.url, headers=batch_service.headers, timeout=120) as http:
        for line, answer in zip(lines, output, strict=True):
            alone = http.post("/tpm/v1/requests", json=line["body"]).json()
            body = answer["response"]["body"]
            assert body["completions"] == alone["completions"] and body["version"] == alone["version"]


def test_the_python_client_and_the_cli_run_a_batch(batch_service, batch_runtime, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tpm_fed.batches.jsonl import BatchFileInvalid
    from tpm_fed.cli import main
    from tpm_fed.client import Client

    path = tmp_path / "lines.jsonl"
    path.write_bytes(jsonl(mixed_lines(6)))
    with Client(batch_service.url, batch_service.token) as client:
        quote = client.batches.quote(path)
        batch = client.batches.submit(path, project="batches", metadata={"run": "1"})
        ended = client.batches.wait(batch["id"], poll_s=0.2, timeout_s=300)
        assert ended["status"] == "completed" and ended["request_counts"]["completed"] == 6
        assert 0 < ended["tpm"]["charged_su"] <= quote["max_su"]
        everything = client.batches.results(batch["id"])
        assert [line["custom_id"] for line in everything] == [f"line-{i}" for i in range(6)]
        assert client.batches.file_content(ended["output_file_id"]) == client.batches.results_jsonl(batch["id"])
        assert batch["id"] in {b["id"] for b in client.batches.list()}
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"custom_id": "x"}\nnot json\n')
        with pytest.raises(BatchFileInvalid, match="line 1: .*line 2: not valid JSON"):
            client.batches.upload(bad)

    monkeypatch.setenv("TPM_URL", batch_service.url)
    monkeypatch.setenv("TPM_TOKEN", batch_service.token)
    cli = CliRunner()
    quoted = cli.invoke(main, ["batch", "submit", str(path), "--quote"])
    assert quoted.exit_code == 0 and "quote: 6 lines for batches: at most" in quoted.output
    assert "Nothing was run or charged" in quoted.output
    waited = cli.invoke(main, ["batch", "submit", str(path), "--project", "batches", "--wait"])
    assert waited.exit_code == 0, waited.output
    batch_id = waited.output.split(":")[0].strip().splitlines()[-1]
    assert "completed" in waited.output and "6 done, 0 failed" in waited.output
    assert batch_id in cli.invoke(main, ["batch", "list"]).output
    assert "charged:" in cli.invoke(main, ["batch", "status", batch_id]).output
    out = tmp_path / "results.jsonl"
    assert cli.invoke(main, ["batch", "results", batch_id, "--out", str(out)]).exit_code == 0
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [f"line-{i}" for i in range(6)]
    finished = cli.invoke(main, ["batch", "cancel", batch_id])
    assert finished.exit_code == 1 and "is completed; only a batch in progress can be cancelled" in finished.output
    refused = cli.invoke(main, ["batch", "submit", str(bad)])
    assert refused.exit_code == 1 and "BatchFileInvalid" in refused.output
    assert "line 2: not valid JSON" in refused.output


def test_projects_take_turns_for_the_runners_lines_and_a_project_runs_its_oldest_batch_first(tmp_path):
    from tpm_fed.batches.protocol import BatchCreateBody, BatchInputLine
    from tpm_fed.batches.store import BatchStore
    from tpm_fed.state import open_database

    store = BatchStore(open_database(f"sqlite:///{tmp_path / 'batches.db'}"))

    def batch(project: str, count: int) -> str:
        lines = [BatchInputLine(custom_id=f"{project}-{i}", method="POST", url="/v1/completions",
                                body={"model": "m", "prompt": "p"}) for i in range(count)]
        body = BatchCreateBody(input_file_id="file-x", endpoint="/v1/completions")
        return store.create_batch("someone", project, body, lines, None)

    big, later_same, other = batch("alpha", 20), batch("alpha", 3), batch("beta", 4)
    first = store.claim(6)
    assert [(c.batch_id, c.index) for c in first] == [
        (big, 0), (other, 0), (big, 1), (other, 1), (big, 2), (other, 2)]  # beta does not wait for alpha's 20
    second = store.claim(4)
    assert [(c.batch_id, c.index) for c in second] == [(big, 3), (other, 3), (big, 4), (big, 5)]
    assert later_same not in {c.batch_id for c in first + second}  # alpha's own batches run oldest first


def test_lines_that_ended_together_are_recorded_in_one_go_each_with_its_own_charge_and_only_once(tmp_path):
    import json
    import time

    from sqlalchemy import insert, select

    from tpm_fed.batches.protocol import BatchCreateBody, BatchInputLine
    from tpm_fed.batches.store import BatchStore, LineEnd
    from tpm_fed.batches.tables import batch_lines_table, batch_results_table
    from tpm_fed.state import open_database
    from tpm_fed.state.schema import charges_table

    store = BatchStore(open_database(f"sqlite:///{tmp_path / 'batches.db'}"))
    lines = [BatchInputLine(custom_id=f"c-{i}", method="POST", url="/v1/completions",
                            body={"model": "m", "prompt": "p"}) for i in range(3)]
    batch_id = store.create_batch("someone", "alpha", BatchCreateBody(input_file_id="file-x",
                                                                       endpoint="/v1/completions"), lines, None)
    assert [c.index for c in store.claim(3)] == [0, 1, 2] and store.claim(3) == []  # each claimed once
    # Line 0 ran twice (a stopped service's run, then this one), line 1 once; line 2 is still running.
    store.submitted([(batch_id, 0, "r0a"), (batch_id, 0, "r0b"), (batch_id, 1, "r1"), (batch_id, 2, "r2")])
    with store.engine.begin() as db:
        db.execute(insert(charges_table), [
            {"request_id": rid, "project": "alpha", "site": "s", "identity": "someone", "model": "m",
             "version": "v", "kind": "generate", "free": False, "state": state, "estimate_usu": 900,
             "charged_usu": usu, "created_at": time.time()}
            for rid, state, usu in [("r0a", "settled", 100), ("r0b", "settled", 20), ("r1", "settled", 7),
                                    ("r2", "reserved", 0)]])
        db.execute(insert(batch_results_table), [{"request_id": rid, "kind": "generate", "result": "{}",
                                                  "created_at": time.time()} for rid in ("r0b", "r1", "r2")])
    store.finish_many([LineEnd(batch_id, 0, "done", 200, {"text": "zero"}, 3, 4),
                       LineEnd(batch_id, 1, "failed", 500, {"error": "one"})])
    store.finish_many([LineEnd(batch_id, 0, "failed", 500, {"error": "again"})])  # ended already: no change
    line = batch_lines_table.c
    with store.engine.connect() as db:
        rows = {row.line_index: row for row in db.execute(select(batch_lines_table)
                                                          .where(line.batch_id == batch_id))}
        kept = {rid for (rid,) in db.execute(select(batch_results_table.c.request_id))}
    assert (rows[0].state, rows[0].status_code, json.loads(rows[0].response), rows[0].charged_usu,
            rows[0].prompt_tokens, rows[0].completion_tokens, rows[0].attempts) == ("done", 200, {"text": "zero"},
                                                                                    120, 3, 4, 1)
    assert (rows[1].state, rows[1].charged_usu, rows[1].attempts) == ("failed", 7, 1)
    assert (rows[2].state, rows[2].charged_usu, rows[2].finished_at) == ("running", 0, None)
    assert kept == {"r2"}  # the ended lines' kept results are gone; a running line's stays


def test_a_waiting_caller_learns_of_the_batchs_end_at_once_not_a_poll_later(batch_service, openai_client):
    """``GET /v1/batches/{id}?wait=S`` is held until the batch ends (or S seconds, capped by the service);
    the Python client's ``wait`` uses it, so its ``poll_s`` paces progress, not when the end is seen.
    OpenAI's clients, which send no ``wait``, are answered at once as before."""
    import time

    from tpm_fed.batches.batch_ends import MAX_WAIT_S
    from tpm_fed.client import Client

    def lines(count: int, tokens: int) -> bytes:
        return jsonl([{"custom_id": f"w-{i}", "method": "POST", "url": "/v1/completions",
                       "body": {"model": DEMO_MODEL_NAME, "prompt": f"The cell {i}", "max_tokens": tokens,
                                "temperature": 0}} for i in range(count)])

    headers = {"Authorization": f"Bearer {batch_service.token}"}
    openai_client.completions.create(model=DEMO_MODEL_NAME, prompt="warm", max_tokens=2)  # no cold start below
    with Client(batch_service.url, batch_service.token) as client:
        long = client.batches.submit(lines(48, 24), project="batches")  # a second or more
        asked = time.monotonic()
        at_once = openai_client.batches.retrieve(long["id"])  # no wait: answered as it is now
        assert at_once.status == "in_progress" and time.monotonic() - asked < 1.0
        asked = time.monotonic()
        short = httpx.get(f"{batch_service.url}/v1/batches/{long['id']}", params={"wait": 0.05}, headers=headers)
        assert short.status_code == 200 and short.json()["status"] == "in_progress"
        assert time.monotonic() - asked >= 0.05  # held for its wait, the batch still running
        assert client.batches.wait(long["id"], poll_s=0.5)["status"] == "completed"

        # A one-line batch ends in well under a second here (a few seconds under load): a poll held up to
        # MAX_WAIT_S (600 asked, cut to it) comes back with its end, long before the wait would run out.
        quick = client.batches.submit(lines(1, 2), project="batches")
        asked = time.monotonic()
        held = httpx.get(f"{batch_service.url}/v1/batches/{quick['id']}", params={"wait": 600}, headers=headers,
                         timeout=60)
        took = time.monotonic() - asked
        assert held.status_code == 200 and held.json()["status"] == "completed", (took, held.json()["tpm"])
        assert took < MAX_WAIT_S - 1 and held.json()["request_counts"]["completed"] == 1

        again = client.batches.submit(lines(1, 2), project="batches")
        asked = time.monotonic()
        ended = client.batches.wait(again["id"], poll_s=MAX_WAIT_S)
        assert ended["status"] == "completed" and time.monotonic() - asked < MAX_WAIT_S - 1

    for wait in ("-1", "nan", "soon"):
        refused = httpx.get(f"{batch_service.url}/v1/batches/{long['id']}", params={"wait": wait}, headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error", wait
