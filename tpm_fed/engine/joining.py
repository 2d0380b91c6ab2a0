"""Requests joining a running task: pushed to a vLLM worker over its channel, taken from the replica's queue.

While a task whose engine takes requests between steps runs, the service's
end of its channel (:mod:`tpm_fed.service.routes_channel`) keeps taking
(:meth:`Joining.take`) every interactive request waiting for its replica,
and batch lines while fewer than ``max_batch`` run, for ``join_for_s``
after the task began (so a busy replica's task still ends). Each is reserved
(:meth:`Joining.reserve`) before the worker sees it, as a batch is before it
leaves. One handed over that the worker never read goes back to the front of
the queue, still reserved, for the next task.

A take waits on the event loop (:mod:`tpm_fed.engine.asks`), never on a thread;
the next take begins while the last one's requests are being reserved, so a
running task always has one open.

An interactive request placed on the loop that serves a running task's
channel does not wait for that take: the route that placed it hands it over
in its own pass (:meth:`Joining.join_now`), reserved on the loop, where the
database's write lock is free at once (:func:`~tpm_fed.state.writing_now`).
The take's wake is a callback queued behind whatever the loop has to do
first, and 16 streams' next requests come together: taken by the take, a
burst waited for the last of its requests to be placed, and was prefilled
in one step (docs/performance.md, tenth session). Otherwise (the lock is
busy, another loop, PostgreSQL) the take has it, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tpm_fed.engine.asks import RESERVING, OpenAsks
from tpm_fed.engine.clock import now
from tpm_fed.engine.locking import OwnedLock
from tpm_fed.engine.pending import Pending, resolve
from tpm_fed.engine.replica_queue import ReplicaQueue
from tpm_fed.engine.reply import ReplyReader
from tpm_fed.engine.running_task import RunningTask
from tpm_fed.engine.settlement import Settlement
from tpm_fed.protocol.errors import SiteError
from tpm_fed.state import WriterBusy, writing_now

JOIN_FOR_S = 225.0
"""How long after it began a running task may take in requests (at most a quarter of the task timeout)."""


class Joining:
    """One replica's running tasks taking its waiting requests in (shares the dispatcher's lock and queue)."""

    def __init__(self, lock: OwnedLock, queue: ReplicaQueue, settlement: Settlement, reader: ReplyReader,
                 join_for_s: float) -> None:
        self.lock, self.queue, self.settlement, self.reader = lock, queue, settlement, reader
        self.join_for_s = join_for_s
        self.asks = OpenAsks()
        self._now: dict[int, Callable[[], bool]] = {}  # id(running task) -> its hand-over in a route's pass

    def join_now(self) -> bool:
        """From the route that just queued an interactive request: hand it (and any others waiting) to a running
        task now, if one takes requests on this thread's event loop and the ledger can reserve them without
        waiting. False: they wait for the tasks' takes."""
        with self.lock:
            handers = list(self._now.values())
        return any(hand() for hand in handers)

    def hands_now(self, task: RunningTask, hand: Callable[[], bool] | None) -> None:
        """``task``'s channel hands requests over in a route's pass with ``hand`` (which says whether it did),
        from now on; None: no more."""
        with self.lock:
            if hand is None:
                self._now.pop(id(task), None)
            else:
                self._now[id(task)] = hand

    def reserve_now(self, task: RunningTask) -> list[dict[str, Any]] | None:
        """On the event loop: the interactive requests waiting that may join ``task``, taken and reserved now
        (their wire forms). None: none waited, the task takes no more, or the ledger would have had to wait
        for another writer (then they are back at the front of the queue, untouched, for the task's take)."""
        with self.lock:
            if not task.joinable or now() - task.started > self.join_for_s:
                return None
            taken = self.queue.take_joining(0)  # no room given to batch lines: interactive requests only
            if not taken:
                return None
            task.joining += len(taken)
        try:
            with writing_now():
                wires, running = self._join(task, taken)
        except WriterBusy:
            with self.lock:
                task.joining -= len(taken)
                self.queue.hand_back(taken)
            return None
        return wires if running else None

    def hooks(self, task: RunningTask) -> TaskHooks:
        return TaskHooks(self, task)

    async def join(self, task: RunningTask, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """Requests that join ``task`` now, reserved; whether more may join later. Waits up to ``wait_s``."""
        taken = await self.take(task, wait_s)
        if not taken:
            return [], taken is not None
        return await self.reserve(task, taken)

    async def take(self, task: RunningTask, wait_s: float) -> list[Pending] | None:
        """Requests that may join ``task`` now (waits up to ``wait_s`` for one: ``[]`` if none came), taken
        from the queue but not yet reserved (:meth:`reserve` next); None: no more may join it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            with self.lock:
                if not task.joinable or now() - task.started > self.join_for_s:
                    return None
                taken = self.queue.take_joining(self.queue.max_batch - task.running)
                if taken:
                    task.joining += len(taken)
                    return taken
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                woken = self.asks.hold()
            try:
                await asyncio.wait_for(woken.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                with self.lock:
                    self.asks.drop(woken)

    async def reserve(self, task: RunningTask, taken: list[Pending]) -> tuple[list[dict[str, Any]], bool]:
        """Reserve what :meth:`take` took, off the loop: their wire forms (those not refused), and whether
        the task still runs (if not, they were settled unsent)."""
        return await asyncio.get_running_loop().run_in_executor(RESERVING, self._join, task, taken)

    def _join(self, task: RunningTask, taken: list[Pending]) -> tuple[list[dict[str, Any]], bool]:
        """Reserve ``taken`` and add it to ``task`` (settled at once if the task ended meanwhile)."""
        try:
            refused = self.settlement.reserve(taken)
        except WriterBusy:  # reserve_now's: nothing was written
            raise
        except Exception as error:  # the log or the ledger could not take them
            refused = {p.request_id: error for p in taken}
        for pending in taken:
            if pending.request_id in refused:
                resolve(pending.future, refused[pending.request_id])
        kept = [p for p in taken if p.request_id not in refused]
        with self.lock:
            task.joining -= len(taken)
            ended = task.closed  # it timed out meanwhile: these never reach it
            if not ended:
                task.join(kept)
        if ended:
            self.settlement.settle(kept, [SiteError(f"the task on site {self.settlement.site!r} these requests "
                                                    "were to join ended first; they were not charged")] * len(kept))
            return [], False
        return [p.request.to_wire() for p in kept], True

    def stop(self, task: RunningTask) -> None:
        with self.lock:
            task.joinable = False
            self.asks.wake()

    def reopen(self, task: RunningTask) -> None:
        """The worker takes requests again (what came as it stopped set its engine running): unless the task
        ended, it may join again, within its window still (:meth:`take`)."""
        with self.lock:
            if not task.closed:
                task.joinable = True

    def answered(self, task: RunningTask, served: Any, answers: dict[str, Any]) -> None:
        """Settle the requests ``task`` answered early (each once; the task's end skips them), read with
        the reply's own models (:meth:`ReplyReader.early`)."""
        finished = now()
        with self.lock:
            claimed = task.claim_answered(list(answers))
            if claimed:
                self.asks.wake()  # room for more to join
        if not claimed:
            return
        facts, read = self.reader.early(served, {p.request_id: answers[p.request_id] for p, _ in claimed})
        outcomes = [self.reader.guarded(p, read[p.request_id], facts, 0.0, finished, was_joined)
                    for p, was_joined in claimed]
        self.settlement.settle([p for p, _ in claimed], outcomes)


class TaskHooks:
    """A running task's hooks for its channel (:class:`tpm_fed.service.channel_session.Joins`)."""

    def __init__(self, joining: Joining, task: RunningTask) -> None:
        self.joining, self.task = joining, task

    async def join(self, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        return await self.joining.join(self.task, wait_s)

    async def take(self, wait_s: float) -> list[Pending] | None:
        return await self.joining.take(self.task, wait_s)

    async def reserve(self, taken: list[Pending]) -> tuple[list[dict[str, Any]], bool]:
        return await self.joining.reserve(self.task, taken)

    def reserve_now(self) -> list[dict[str, Any]] | None:
        return self.joining.reserve_now(self.task)

    def hands_now(self, hand: Callable[[], bool] | None) -> None:
        self.joining.hands_now(self.task, hand)

    def stop_joining(self) -> None:
        self.joining.stop(self.task)

    def reopen_joining(self) -> None:
        self.joining.reopen(self.task)

    def answered(self, served: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
        self.joining.answered(self.task, served, outcomes)
