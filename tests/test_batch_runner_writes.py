"""The batch runner's database work per line: lines answered one at a time (as a vLLM replica answers early)
must not cost a claim, a note of ids and a look at every open batch each.

Each database transaction takes SQLite's one write lock (``BEGIN IMMEDIATE``), and an interactive request's
reservation waits behind it, so the runner's transactions per line are counted here, on the real store with a
fake engine that answers the lines one by one; and each line must still end once, with its answer and the
ledger's charge, and the batch's waiter be woken at its end.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import event, insert, select

from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.protocol import BatchCreateBody, BatchInputLine
from tpm_fed.batches.runner import BatchRunner
from tpm_fed.batches.store import BatchStore, LineEnd
from tpm_fed.batches.tables import batch_lines_table, batches_table
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import ChargeInfo, Completion, GenerationResult, ReplicaInfo, Timings, Usage
from tpm_fed.state import open_database
from tpm_fed.state.schema import charges_table


class _Body(BaseModel):
    prompt: str
    project: str | None = None


class _Route:
    """A route whose answer is the prompt echoed (what the runner does with it is what is tested)."""

    body_model = _Body

    def request_for(self, body: _Body) -> GenerationRequest:
        return GenerationRequest.create(body.prompt, "m", max_new_tokens=1)

    def render(self, body: _Body, request: GenerationRequest, result: Any) -> dict[str, Any]:
        return {"echo": body.prompt, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


def _result(request: GenerationRequest, charged: bool) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id, model="m", version="v", backend="torch", site="s",
        replica=ReplicaInfo(replica_id="r", host="h", pid=1, warm=True, batch_size=1),
        usage=Usage(prompt_tokens=1, completion_tokens=1), timings=Timings(queue_s=0, load_s=0, run_s=0),
        completions=[Completion(text="x", token_ids=[1], finish_reason="length")],
        charge=ChargeInfo(project="alpha", charged_su=7e-6, estimate_su=9e-4, free=False) if charged else None)


class _OneAtATime:
    """An engine that answers the requests it was given one at a time, a little apart, from its own thread,
    each after its charge is settled in the ledger, as the bookkeeper settles before a future resolves: with
    ``writers``, those added are called in that transaction with the result annotated with its charge, which
    the caller then gets (the bookkeeper's way); with ``rolled_back`` as well, that transaction fails after the
    writers ran, its charge is settled again alone, and the caller gets the result as the worker sent it."""

    def __init__(self, store: BatchStore, *, writers: bool = False, rolled_back: bool = False) -> None:
        self.store = store
        self.writers: list = [] if writers else None
        self.rolled_back = rolled_back
        self.queue: list[tuple[GenerationRequest, str, Future]] = []
        self.cond = threading.Condition()
        self.served: list[str] = []
        threading.Thread(target=self._answer, daemon=True).start()

    def submit(self, request, identity=None, *, background=False) -> Future:
        future: Future = Future()
        with self.cond:
            self.queue.append((request, identity, future))
            self.cond.notify()
        return future

    def burst(self):
        return nullcontext()

    def add_outcome_writer(self, writer) -> None:
        if self.writers is not None:
            self.writers.append(writer)

    def _settle(self, request: GenerationRequest, identity: str, annotated: Any) -> None:
        with self.store.engine.begin() as db:
            db.execute(insert(charges_table).values(
                request_id=request.request_id, project="alpha", site="s", identity=identity, model="m",
                version="v", kind="generate", free=False, state="settled", estimate_usu=900, charged_usu=7,
                created_at=time.time()))
            for writer in self.writers or ():
                writer({request.request_id: annotated}, db)
            if self.rolled_back and annotated is not None:
                raise RuntimeError("the outcomes' transaction failed")

    def _answer(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue)
                request, identity, future = self.queue.pop(0)
            annotated = _result(request, charged=True)
            try:
                self._settle(request, identity, annotated)
            except RuntimeError:  # rolled back: settled alone (the sweeper's part), the worker's own result goes
                self._settle(request, identity, None)
                annotated = _result(request, charged=False)
            self.served.append(request.request_id)
            future.set_result(annotated)
            time.sleep(0.002)


def _batch(store: BatchStore, lines: int) -> str:
    return store.create_batch("someone", "alpha", BatchCreateBody(input_file_id="file-x", endpoint="/v1/completions"),
                              [BatchInputLine(custom_id=f"c-{i}", method="POST", url="/v1/completions",
                                              body={"prompt": f"p{i}"}) for i in range(lines)], None)


@pytest.mark.parametrize("how", ["recorded by the runner", "ended with its charge", "that transaction failed"])
def test_lines_answered_one_at_a_time_cost_at_most_one_transaction_more_each_and_end_once(tmp_path, how):
    import asyncio

    store = BatchStore(open_database(f"sqlite:///{tmp_path / 'b.db'}"))
    engine = _OneAtATime(store, writers=how != "recorded by the runner", rolled_back=how == "that transaction failed")
    transactions = []
    event.listen(store.engine, "begin", lambda connection: transactions.append(threading.current_thread().name))
    runner = BatchRunner(engine, store, LineRoutes({"/v1/completions": _Route()}), window=16, poll_s=60.0)
    lines = 64
    batch_id = _batch(store, lines)
    runner.start()
    try:
        async def until_ended() -> bool:  # the long poll's way: woken at the batch's end
            watched = runner.ends.watch(batch_id)
            if store.batch(batch_id, "someone").status == "completed":
                return True
            return await runner.ends.wait(watched, 30.0)

        counted = len(transactions)
        runner.wake()  # as the create route does
        assert asyncio.run(until_ended())
        during = len(transactions) - counted
    finally:
        runner.stop(grace_s=5)
    line = batch_lines_table.c
    with store.engine.connect() as db:
        rows = db.execute(select(line.state, line.response, line.charged_usu, line.request_ids, line.attempts)
                          .where(line.batch_id == batch_id)).all()
        status = db.execute(select(batches_table.c.status).where(batches_table.c.batch_id == batch_id)).scalar_one()
    assert status == "completed"
    assert len(engine.served) == lines and len(set(engine.served)) == lines  # each line ran once
    assert all(row.state == "done" and row.charged_usu == 7 and row.attempts == 1 for row in rows)
    assert sorted(row.request_ids.split()[0] for row in rows) == sorted(engine.served)
    assert sorted(json.loads(row.response)["echo"] for row in rows) == sorted(f"p{i}" for i in range(lines))
    # Each answer is one transaction of the engine's (its charge; two when it failed) and at most one of the
    # runner's (its end, recorded with any answered beside it, or none when it ended in the engine's);
    # claims and notes of ids come per quarter window, not per line.
    runners = during - lines * (2 if how == "that transaction failed" else 1)
    at_most = {"recorded by the runner": 1.5, "ended with its charge": 0.6, "that transaction failed": 1.5}[how]
    assert runners <= at_most * lines, f"{runners} transactions of the runner for {lines} lines"


def test_the_last_lines_recorded_end_their_batch_in_the_same_transaction(tmp_path):
    store = BatchStore(open_database(f"sqlite:///{tmp_path / 'b.db'}"))
    done, cancelled = _batch(store, 2), _batch(store, 2)
    claimed = store.claim(4)
    assert len(claimed) == 4
    store.cancel(cancelled, "someone")  # its lines run on; it is cancelled when they have ended
    ends = [LineEnd(c.batch_id, c.index, "done", 200, {"n": c.index}, request_ids=()) for c in claimed]
    assert store.finish_many(ends[:1]) == []  # one line of each batch is left
    assert sorted(store.finish_many(ends[1:])) == sorted([done, cancelled])
    assert store.batch(done, "someone").status == "completed"
    assert store.batch(cancelled, "someone").status == "cancelled"
    assert store.settle_batches() == []  # nothing left for the look at every batch
