"""The batch runner's database work per line: lines answered one at a time (as a vLLM replica answers early)
must not cost a claim, a note of ids and a look at every open batch each.

Each database transaction takes SQLite's one write lock (``BEGIN IMMEDIATE``), and an interactive request's
reservation waits behind it, so the runner's transactions per line are counted here, on the real store with a
fake engine that answers the lines one by one; and each line must still end once, with its answer and the
ledger's charge, and the batch's waiter be woken at its end.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

from pydantic import BaseModel
from sqlalchemy import event, insert, select

from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.protocol import BatchCreateBody, BatchInputLine
from tpm_fed.batches.runner import BatchRunner
from tpm_fed.batches.store import BatchStore, LineEnd
from tpm_fed.batches.tables import batch_lines_table, batches_table
from tpm_fed.protocol.requests import GenerationRequest
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


class _OneAtATime:
    """An engine that answers the requests it was given one at a time, a little apart, from its own thread,
    each after its charge is settled in the ledger (as the bookkeeper settles before a future resolves)."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store
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
        pass

    def _answer(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue)
                request, identity, future = self.queue.pop(0)
            with self.store.engine.begin() as db:  # the ledger's settled charge of this request
                db.execute(insert(charges_table).values(
                    request_id=request.request_id, project="alpha", site="s", identity=identity, model="m",
                    version="v", kind="generate", free=False, state="settled", estimate_usu=900, charged_usu=7,
                    created_at=time.time()))
            self.served.append(request.request_id)
            future.set_result(object())
            time.sleep(0.002)


def _batch(store: BatchStore, lines: int) -> str:
    return store.create_batch("someone", "alpha", BatchCreateBody(input_file_id="file-x", endpoint="/v1/completions"),
                              [BatchInputLine(custom_id=f"c-{i}", method="POST", url="/v1/completions",
                                              body={"prompt": f"p{i}"}) for i in range(lines)], None)


def test_lines_answered_one_at_a_time_cost_about_one_transaction_each_and_end_once(tmp_path):
    import asyncio

    store = BatchStore(open_database(f"sqlite:///{tmp_path / 'b.db'}"))
    engine = _OneAtATime(store)
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
    # Each answer is one transaction of the engine's (its charge) and at most one of the runner's (its end,
    # recorded with any answered beside it); claims and notes of ids come per quarter window, not per line.
    runners = during - lines
    assert runners <= 1.5 * lines, f"{runners} transactions of the runner for {lines} lines"


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
