"""A batch's life beyond the happy path: cancelled halfway, and its service killed halfway.

Exactly once is checked against the database itself: each line's request
ids (written before each run went out) against the ledger's rows for them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import openai
import pytest
from sqlalchemy import select

from tests.batch_helpers import batch_home, jsonl, mixed_lines, read_jsonl, wait_for
from tests.service_helpers import openai_client, served
from tpm_fed.batches.tables import batch_lines_table
from tpm_fed.state import open_database
from tpm_fed.state.schema import MICRO, charges_table


def _lines_and_charges(database_url: str, batch_id: str) -> tuple[list, dict[str, tuple[str, int]]]:
    engine = open_database(database_url)
    with engine.connect() as db:
        lines = db.execute(select(batch_lines_table).where(batch_lines_table.c.batch_id == batch_id)
                           .order_by(batch_lines_table.c.line_index)).all()
        charges = {row.request_id: (row.state, row.charged_usu)
                   for row in db.execute(select(charges_table.c.request_id, charges_table.c.state,
                                                charges_table.c.charged_usu))}
    engine.dispose()
    return lines, charges


def _assert_each_line_charged_once(lines, charges) -> int:
    """Every line that ran has exactly one settled charge, and its recorded charge is that one; the rest none."""
    total = 0
    for line in lines:
        settled = [charges[rid][1] for rid in line.request_ids.split() if charges.get(rid, ("", 0))[0] == "settled"]
        if line.state == "done":
            assert len(settled) == 1, (line.custom_id, line.request_ids, [charges.get(r) for r in
                                                                          line.request_ids.split()])
            assert line.charged_usu == settled[0] > 0
        else:
            assert settled == [] and line.charged_usu == 0, line.custom_id
        total += line.charged_usu
    assert not any(state == "reserved" for state, _ in charges.values())  # nothing left held
    return total


def test_cancel_halfway_charges_the_finished_lines_only(tmp_path, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    home = batch_home(tmp_path / "home", demo_model_dir, max_batch_requests=2)
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        client = openai_client(url, token)
        lines = mixed_lines(30, routes=("/v1/completions",), tokens=24)
        file_id = client.files.create(file=("c.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        wait_for(client, batch.id, done=lambda b: b.request_counts.completed >= 4)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
        ended = wait_for(client, batch.id)
        assert ended.status == "cancelled" and ended.cancelled_at is not None
        counts = ended.request_counts
        tpm = ended.model_extra["tpm"]
        assert counts.total == 30 and counts.failed == 0 and 4 <= counts.completed < 30
        assert counts.completed + tpm["cancelled"] == 30 and tpm["running"] == tpm["pending"] == 0

        output = read_jsonl(client.files.content(ended.output_file_id).content)
        errors = read_jsonl(client.files.content(ended.error_file_id).content)
        assert len(output) == counts.completed and len(errors) == tpm["cancelled"]
        assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)
        assert sorted(int(x["custom_id"].split("-")[1]) for x in output + errors) == list(range(30))

        rows, charges = _lines_and_charges(home.database_url, batch.id)
        total = _assert_each_line_charged_once(rows, charges)
        assert ended.model_extra["tpm"]["charged_su"] == pytest.approx(total / MICRO)
        (balance,) = runtime.ledger.balances("batches")
        assert (balance.spent_usu, balance.reserved_usu) == (total, 0)

        with pytest.raises(openai.BadRequestError, match="is cancelled"):
            client.batches.cancel(batch.id)
        small = client.files.create(file=("s.jsonl", io.BytesIO(jsonl(lines[:1]))), purpose="batch").id
        finished = wait_for(client, client.batches.create(input_file_id=small, endpoint="/v1/completions",
                                                          completion_window="24h").id)
        with pytest.raises(openai.BadRequestError, match="is completed; only a batch in progress"):
            client.batches.cancel(finished.id)


def test_a_line_that_fails_twice_gets_its_error_and_the_rest_go_on(tmp_path, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    home = batch_home(tmp_path / "home", demo_model_dir, truncated=True)
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        client = openai_client(url, token)
        lines = mixed_lines(6, routes=("/v1/completions",))
        lines[2]["body"]["model"] = "truncated"  # valid, quoted, placed: its replica cannot load
        file_id = client.files.create(file=("f.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        ended = wait_for(client, client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                       completion_window="24h").id)
        assert ended.status == "completed"
        assert (ended.request_counts.completed, ended.request_counts.failed) == (5, 1)
        (failed,) = read_jsonl(client.files.content(ended.error_file_id).content)
        assert failed["custom_id"] == "line-2" and failed["error"] is None
        assert failed["response"]["status_code"] == 503
        assert failed["response"]["body"]["error"]["code"] == "ModelLoadError"
        output = read_jsonl(client.files.content(ended.output_file_id).content)
        assert [o["custom_id"] for o in output] == ["line-0", "line-1", "line-3", "line-4", "line-5"]
        rows, charges = _lines_and_charges(home.database_url, ended.id)
        assert len(rows[2].request_ids.split()) == 2 and rows[2].attempts == 2  # tried twice
        _assert_each_line_charged_once(rows, charges)


def test_a_line_charged_before_a_kill_is_answered_from_its_kept_result_not_run_again(tmp_path, demo_model_dir):
    """The predecessor is simulated where it matters (as tests/test_restart.py does): a line whose run was
    settled in the ledger, its result kept in that same transaction, but whose answer was never recorded."""
    from sqlalchemy import insert, update

    from tpm_fed.batches.tables import batch_results_table, batches_table
    from tpm_fed.service.assembly import ServiceAssembly

    home = batch_home(tmp_path / "home", demo_model_dir)
    lines = [{"custom_id": f"n-{i}", "method": "POST", "url": "/tpm/v1/requests",
              "body": {"kind": "generate", "model": {"name": "demo-llama"}, "prompts": [f"The cell {i}"],
                       "max_new_tokens": 6}} for i in range(3)]
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        client = openai_client(url, token)
        file_id = client.files.create(file=("n.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        first = wait_for(client, client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                       completion_window="24h").id)
        answers = read_jsonl(client.files.content(first.output_file_id).content)
    rows, charges = _lines_and_charges(home.database_url, first.id)
    # Back to the moment before line 1's answer was written: charged, result kept (the native route's answer
    # is the result's wire form), the line still running, the batch in progress.
    engine = open_database(home.database_url)
    with engine.begin() as db:
        rid = answers[1]["response"]["request_id"]
        db.execute(insert(batch_results_table).values(request_id=rid, kind="generate",
                                                      result=json.dumps(answers[1]["response"]["body"]),
                                                      created_at=time.time()))
        db.execute(update(batch_lines_table).where(batch_lines_table.c.batch_id == first.id,
                                                   batch_lines_table.c.line_index == 1)
                   .values(state="running", response=None, status_code=None, charged_usu=0))
        db.execute(update(batches_table).where(batches_table.c.batch_id == first.id)
                   .values(status="in_progress", completed_at=None, finalizing_at=None))
    engine.dispose()

    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        client = openai_client(url, token)
        again = wait_for(client, first.id)
        replayed = read_jsonl(client.files.content(again.output_file_id).content)
        assert runtime.status()[0].state == "stopped"  # nothing was run: the site never started
    assert again.status == "completed" and again.request_counts.completed == 3
    assert replayed[1]["response"] == answers[1]["response"]  # the same answer, the same request id
    rows_after, charges_after = _lines_and_charges(home.database_url, first.id)
    assert charges_after == charges  # not charged again
    assert [r.request_ids for r in rows_after] == [r.request_ids for r in rows]  # not sent again
    assert rows_after[1].charged_usu == rows[1].charged_usu > 0


def test_a_killed_service_resumes_its_batch_and_runs_every_line_once(tmp_path, demo_model_dir):
    from tpm_fed.connection import ensure_service

    home = batch_home(tmp_path / "home", demo_model_dir, max_batch_requests=4)
    lines = mixed_lines(40, routes=("/v1/completions",), tokens=24)
    first = ensure_service(home, idle_timeout_s=600)
    second = None
    try:
        client = openai_client(first.url, first.token)
        file_id = client.files.create(file=("k.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        halfway = wait_for(client, batch.id, done=lambda b: b.request_counts.completed >= 8, timeout_s=240)
        os.kill(first.pid, signal.SIGKILL)  # no goodbye: lines in flight are lost with it
        _wait_gone(first.pid)
        assert halfway.request_counts.completed < 40, "the batch ended before the kill: make it longer"

        second = ensure_service(home, idle_timeout_s=600)
        client = openai_client(second.url, second.token)
        ended = wait_for(client, batch.id, timeout_s=300)
        assert ended.status == "completed"
        assert (ended.request_counts.total, ended.request_counts.completed, ended.request_counts.failed) == (40, 40, 0)
        output = read_jsonl(client.files.content(ended.output_file_id).content)
        assert [o["custom_id"] for o in output] == [line["custom_id"] for line in lines]  # each once, in order

        rows, charges = _lines_and_charges(home.database_url, batch.id)
        # The kill cut lines off in flight (the runner keeps a window of them out): they went out again.
        assert any(len(row.request_ids.split()) > 1 for row in rows)
        total = _assert_each_line_charged_once(rows, charges)
        assert ended.model_extra["tpm"]["charged_su"] == pytest.approx(total / MICRO)
        # The project paid exactly the lines: nothing for the runs the kill cut off.
        assert sum(usu for state, usu in charges.values() if state == "settled") == total
        for row, answer in zip(rows, output, strict=True):
            # The answer is its charged run's: from the run itself, or from the result the killed service
            # kept beside that run's charge (then it names the earlier id, and nothing ran again).
            rid = answer["response"]["request_id"]
            assert rid in row.request_ids.split() and charges[rid][0] == "settled"
            assert answer["response"]["body"]["tpm"]["charge"]["charged_su"] == pytest.approx(charges[rid][1] / MICRO)
    finally:
        for address in (first, second):
            if address is not None:
                _stop(address.pid)


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it, or it lingers as a zombie
        except ChildProcessError:
            finished = pid
        if finished == pid:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not end")


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _wait_gone(pid, timeout_s=90)


def test_a_batch_past_its_window_expires_its_unrun_lines_and_charges_the_finished(tmp_path, demo_model_dir):
    from sqlalchemy import update

    from tpm_fed.batches.tables import batches_table
    from tpm_fed.service.assembly import ServiceAssembly

    home = batch_home(tmp_path / "home", demo_model_dir, max_batch_requests=2)
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        client = openai_client(url, token)
        lines = mixed_lines(30, routes=("/v1/completions",), tokens=24)
        file_id = client.files.create(file=("e.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        wait_for(client, batch.id, done=lambda b: b.request_counts.completed >= 4)
        with runtime.ledger.engine.begin() as db:  # its 24 hours are up
            db.execute(update(batches_table).where(batches_table.c.batch_id == batch.id)
                       .values(expires_at=time.time() - 1))
        ended = wait_for(client, batch.id, done=lambda b: b.status not in ("in_progress", "finalizing"))
        assert ended.status == "expired" and ended.expired_at is not None
        tpm = ended.model_extra["tpm"]
        assert 4 <= ended.request_counts.completed < 30 and tpm["running"] == tpm["pending"] == 0
        output = read_jsonl(client.files.content(ended.output_file_id).content)
        errors = read_jsonl(client.files.content(ended.error_file_id).content)
        assert len(output) == ended.request_counts.completed and len(output) + len(errors) == 30
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
        rows, charges = _lines_and_charges(home.database_url, batch.id)
        total = _assert_each_line_charged_once(rows, charges)
        (balance,) = runtime.ledger.balances("batches")
        assert (balance.spent_usu, balance.reserved_usu) == (total, 0)
        with pytest.raises(openai.BadRequestError, match="is expired"):
            client.batches.cancel(batch.id)


def test_uploaded_files_are_listed_and_deleted_by_their_owner_only(tmp_path, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    home = batch_home(tmp_path / "home", demo_model_dir)
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        client = openai_client(url, token)
        lines = mixed_lines(2, routes=("/v1/completions",), tokens=4)
        first, second = (client.files.create(file=(f"{n}.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
                         for n in ("a", "b"))
        assert [f.id for f in client.files.list()] == [second, first]  # newest first
        page = client.files.list(limit=1)
        assert [f.id for f in page.data] == [second] and page.has_more
        assert [f.id for f in client.files.list(after=second)] == [first]  # the next page, by OpenAI's cursor
        with pytest.raises(openai.BadRequestError, match="no file"):
            client.files.list(after="file-nobodys")
        batch = wait_for(client, client.batches.create(input_file_id=first, endpoint="/v1/completions",
                                                       completion_window="24h").id)
        assert client.files.delete(first).deleted is True
        assert [f.id for f in client.files.list()] == [second]
        with pytest.raises(openai.PermissionDeniedError):  # gone: the same answer as an unknown id
            client.files.retrieve(first)
        with pytest.raises(openai.PermissionDeniedError):
            client.files.delete(first)
        assert len(read_jsonl(client.files.content(batch.output_file_id).content)) == 2  # the batch keeps its lines
        with pytest.raises(openai.BadRequestError, match="goes with the batch"):
            client.files.delete(batch.output_file_id)
        store = assembly.batches.store
        with pytest.raises(Exception, match="no file"):  # another identity sees nothing of it
            store.delete_file(second, "someone-else")
        assert store.files_of("someone-else") == ([], False)
