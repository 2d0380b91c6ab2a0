"""The driver of one replica: its queue, its running tasks and its site, under one lock.

The parts decide; this file only connects them and owns the lock:
:mod:`~tpm_fed.engine.replica_queue` decides what leaves and when,
:mod:`~tpm_fed.engine.running_task` keeps who settles each request once,
:mod:`~tpm_fed.engine.reply` reads a task's reply, :mod:`~tpm_fed.engine.settlement`
reserves and settles (a request lost with its site goes up to the replica pool unsettled),
:mod:`~tpm_fed.engine.joining` lets a running vLLM task take requests in,
:mod:`~tpm_fed.engine.clock` runs lingers and task timeouts on one thread.

A worker slot always comes back, by construction: a slot is taken only by the
queue's :meth:`~ReplicaQueue.take_batch` and given back only in :meth:`_on_slot`,
which every batch runs through and which every ended task (answered, failed,
timed out, or never started) calls again. A task unanswered after
``task_timeout_s`` fails with :class:`~tpm_fed.errors.SiteError` (not charged);
an answer after that is dropped. Methods named ``*_locked`` must be called with
the lock held, and check that they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from tpm_fed.engine.interface import TaskChannels
from tpm_fed.engine.joining import JOIN_FOR_S, Joining
from tpm_fed.engine.clock import Clock, Timed, now
from tpm_fed.engine.locking import OwnedLock
from tpm_fed.engine.pending import Pending, resolve
from tpm_fed.engine.replica_queue import ReplicaQueue
from tpm_fed.engine.reply import Outcome, ReplyReader, read_reply
from tpm_fed.engine.running_task import RunningTask
from tpm_fed.engine.settlement import Settlement, SettlementRecorder
from tpm_fed.protocol.entrypoints import SERVE_BATCH
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.limits import request_bytes
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.sites.base import Site

logger = logging.getLogger(__name__)


class ReplicaDispatcher:
    """Sends one model version's requests to one site, batching under load.

    Args:
        site: Where the serving function runs.
        spec: The model version every request here uses.
        max_batch: Most requests in one task.
        max_in_flight: Tasks outstanding at once (the site's worker count).
        linger_s: Quiet time that ends a linger when a worker is free (0 sends at once).
        task_timeout_s: A task unanswered for this long fails its requests (None: wait forever).
        recorder: Reserves requests before they leave; told of each outcome before its future resolves.
        lost_goes_up: A request lost with its site is not settled here: its future fails with the
            :class:`~tpm_fed.protocol.errors.SiteError`, still reserved, for the submitter (the replica
            pool) to place again or settle. False: settled here like any failure.
        context: What the site allows, passed to the serving function.
        channels: The service's back channel (None: tasks run without one; nothing streams or joins).
        held: True while a caller places a burst that should leave together (see ``ReplicaQueue.linger_over``).
        join_for_s: How long after it began a running task may take in waiting requests
            (:data:`JOIN_FOR_S` by default, at most a quarter of ``task_timeout_s``; 0: never).
        borrow: When a worker slot here comes back with room in the next task: ``borrow(self, room)`` gives
            batch lines waiting for a busy sibling replica, placed here now (work stealing: at a batch's end one
            site does not run a last task while another idles). None: none are taken.
    """

    def __init__(self, site: Site, spec: ModelSpec, *, max_batch: int, max_in_flight: int, linger_s: float = 0.0,
                 task_timeout_s: float | None = None, recorder: SettlementRecorder | None = None,
                 context: dict[str, Any] | None = None, lost_goes_up: bool = False,
                 channels: TaskChannels | None = None, held: Callable[[], bool] | None = None,
                 join_for_s: float | None = None,
                 borrow: Callable[[ReplicaDispatcher, int], list[Pending]] | None = None) -> None:
        self.site, self.spec = site, spec
        self.borrow = borrow
        self.task_timeout_s = task_timeout_s
        self.channels, self.held = channels, held
        self.context = context or {}
        if join_for_s is None:
            join_for_s = JOIN_FOR_S if task_timeout_s is None else min(JOIN_FOR_S, task_timeout_s / 4)
        # Only an engine that takes requests in while it runs gets them ("auto" may be vLLM; torch never asks).
        joins = frozenset(name for name, kind in KINDS.items() if kind.may_join(spec.backend))
        join_for_s = join_for_s if joins else 0.0
        self._lock = OwnedLock()
        self._queue = ReplicaQueue(max_batch=max_batch, max_in_flight=max_in_flight, linger_s=linger_s, joins=joins)
        self._reader = ReplyReader(spec, site.name)
        self._settlement = Settlement(site.name, spec, recorder, lost_goes_up)
        self._joining = Joining(self._lock, self._queue, self._settlement, self._reader, join_for_s)
        self._clock = Clock(f"tpm-dispatch-{site.name}")
        self._linger: Timed | None = None

    @property
    def max_batch(self) -> int:
        return self._queue.max_batch

    @property
    def max_in_flight(self) -> int:
        return self._queue.max_in_flight

    @property
    def join_for_s(self) -> float:
        return self._joining.join_for_s

    @property
    def waiting(self) -> int:
        """Requests queued here that no task carries yet."""
        return self._queue.waiting

    def position(self, request_id: str) -> int | None:
        """Where a waiting request stands in this queue (1: next to leave), or None if not waiting here."""
        with self._lock:
            return self._queue.position(request_id)

    def estimated_start_s(self, position: int, service_s: float) -> float:
        """Seconds until the request at ``position`` leaves, for tasks taking ``service_s`` each."""
        with self._lock:
            return self._queue.estimated_start_s(position, service_s)

    def submit(self, request: ServingRequest, nbytes: int | None = None, *, background: bool = False,
               send_on: Executor | None = None) -> Future[ServedResult]:
        """Queue ``request``; ``nbytes`` is its size in a task, if the caller measured it already.

        A ``background`` request (a batch's line) leaves only when no interactive request
        waits here, so a person's request waits at most for the task running now. ``send_on``: a
        batch that leaves at once is reserved and sent there, not on the caller's thread (an event loop).
        """
        pending = Pending(request, Future(), nbytes=request_bytes(request) if nbytes is None else nbytes,
                          background=background)
        with self._lock:
            batch = self._queue.arrive(pending, pending.submitted, background)
            self._follow_linger_locked()
            handing = not (batch or background)  # an interactive request that waits: it may join at once
            if not handing:
                self._joining.asks.wake()
        # A running task whose channel is on this thread's event loop takes it in this pass; else a take does.
        if handing and not self._joining.join_now():
            with self._lock:
                self._joining.asks.wake()
        if batch and send_on is not None:
            send_on.submit(self._on_slot, batch)
        else:
            self._on_slot(batch)
        return pending.future

    def lend(self, count: int) -> list[Pending]:
        """Up to ``count`` batch lines waiting here, not reserved, for a sibling replica with a free worker to
        take (none while a worker here is free). The taker places them again, or gives them back."""
        with self._lock:
            return self._queue.lend(count)

    def adopt(self, pendings: list[Pending]) -> None:
        """Batch lines placed here from a sibling's queue (or given back to this one): last in line; they leave
        with the next task (at once if a worker is free)."""
        if not pendings:
            return
        with self._lock:
            self._queue.adopt(pendings)
            batch = self._queue.take_batch()
            self._follow_linger_locked()
        self._on_slot(batch)

    def nudge(self) -> None:
        """A burst was placed: let what waits leave (after the usual short linger)."""
        with self._lock:
            self._queue.nudge(now())
            self._follow_linger_locked()

    def _follow_linger_locked(self) -> None:
        """Keep the clock's timer where the queue's linger says (armed, moved or cancelled)."""
        self._lock.assert_held()
        due = self._queue.linger_at
        if self._linger is not None and (due is None or self._linger.when != due):
            self._linger.cancel()
            self._linger = None
        if due is not None and self._linger is None:
            self._linger = self._clock.call_at(due, self._linger_over)

    def _linger_over(self, timed: Timed) -> None:
        with self._lock:
            if self._linger is not timed:  # moved or cancelled after it came due
                return
            self._linger = None
            batch = self._queue.linger_over(now(), self.held is not None and self.held())
            self._follow_linger_locked()
        self._on_slot(batch)

    def _on_slot(self, batch: list[Pending] | None) -> None:
        """Run batches on one worker slot while any waits, then give it back: the one place a slot is freed.

        ``batch`` holds a slot the queue took for it ([]: none was taken); None: the slot's task just
        ended. A started task owns the slot until its end calls here again.
        """
        if batch == []:
            return
        while True:
            if batch is None:
                self._borrow_for_next_task()
                with self._lock:
                    batch = self._queue.free_slot()
                    self._follow_linger_locked()
                if not batch:
                    return
            if self._start(batch):
                return
            batch = None

    def _borrow_for_next_task(self) -> None:
        """A slot is coming back: fill the room its next task has with a busy sibling's waiting batch lines
        (called without the lock: the sibling's is taken, never both)."""
        if self.borrow is None:
            return
        with self._lock:
            room = self._queue.max_batch - self._queue.waiting
        if room <= 0:
            return
        try:
            taken = self.borrow(self, room)
        except Exception:  # never in the way of the slot coming back
            logger.exception("could not take batch lines from a sibling replica")
            return
        if taken:
            with self._lock:
                self._queue.adopt(taken)

    def _start(self, batch: list[Pending]) -> bool:
        """Reserve ``batch`` and run what is not refused as one task; False if no task started (every
        request refused, or a bug: the requests fail typed). Never raises."""
        try:
            try:
                refused, failed = self._settlement.reserve(batch), None
            except Exception as error:  # the log or the ledger could not take the batch: it fails as a task
                refused, failed = {}, error
            for p in batch:  # refused at reservation: they fail now (a caller may have cancelled meanwhile)
                if p.request_id in refused:
                    resolve(p.future, refused[p.request_id])
            kept = [p for p in batch if p.request_id not in refused]
            if kept:
                self._launch(kept, failed)
            return bool(kept)
        except Exception as error:
            logger.exception("could not send a batch of %d requests", len(batch))
            for p in batch:
                resolve(p.future, error)
            return False

    def _launch(self, pending: list[Pending], failed: Exception | None) -> None:
        """Submit ``pending`` as one task (``failed``: as a task that failed so). Whatever goes wrong before
        the task is out (the back channel, the timer, the site) becomes the task's failure, so its end
        settles the requests and gives the slot back, as for any other task."""
        running = RunningTask(pending)
        task: Future = Future()
        hub = channel = None
        try:
            if failed is not None:
                raise failed
            if self.task_timeout_s is not None:
                running.timer = self._clock.call_at(now() + self.task_timeout_s, lambda _: self._end(running, None))
            hub = self.channels
            hooks = self._joining.hooks(running) if self.join_for_s > 0 else None
            channel = hub.open([p.request_id for p in pending], hooks) if hub is not None else None
            context = self.context
            if channel is not None:
                context = {**context, "stream": channel}
                running.joinable = hooks is not None
            task = self.site.submit(SERVE_BATCH, self.spec.to_wire(), [p.request.to_wire() for p in pending],
                                    context)
        except Exception as error:  # the task could not be started
            task = Future()
            task.set_exception(error)
        if channel is not None:
            task.add_done_callback(lambda _: hub.close(channel["token"]))
        task.add_done_callback(lambda done: self._end(running, done))

    def _end(self, running: RunningTask, done: Future | None) -> None:
        """``running`` ended (``done``: its future; None: no answer in time). The first to end it settles
        what it had not answered and frees its slot; a later end (an answer after the timeout) is dropped."""
        with self._lock:
            closing = running.close()
            if closing:
                self._joining.asks.wake()  # an ask held open for it ends now
                own, joined = running.claim_unanswered()
        if not closing:
            logger.warning("a batch of %d requests answered after its timeout; dropped", len(running.pending))
            return
        try:
            try:
                settled, outcomes, unread = self._outcomes(running, own, joined, done)
            except Exception as error:  # a reply no check foresaw: its requests fail typed
                settled, unread = own + joined, []
                outcomes = [self._reader.malformed(f"{type(error).__name__}: {error}")] * len(settled)
            if unread:  # handed over as the task ended, never read: back to the front, still reserved
                with self._lock:
                    self._queue.hand_back(unread)
            self._settlement.settle(settled, outcomes)
        finally:
            self._on_slot(None)

    def _outcomes(self, running: RunningTask, own: list[Pending], joined: list[Pending], done: Future | None
                  ) -> tuple[list[Pending], list[Outcome], list[Pending]]:
        """The requests the ended task settles, their outcomes, and the joined ones it never read."""
        everyone = own + joined
        if done is None:
            error = SiteError(f"site {self.site.name!r} gave no answer within {self.task_timeout_s:g} s "
                              "(task_timeout_s); the requests were not charged")
            return everyone, [error] * len(everyone), []
        try:
            raw = done.result()
        except Exception as error:
            return everyone, [error] * len(everyone), []
        finished = now()
        reply = read_reply(raw, len(running.pending))
        if isinstance(reply, Exception):  # the worker may have run the joined ones too: they fail with it
            return own + joined, [self._reader.malformed(str(reply), whole=True)] * len(own + joined), []
        answers = dict(zip([p.request_id for p in running.pending],
                           self._reader.task(running.pending, reply, finished), strict=True))
        named = reply.joined
        # Joined requests the reply does not name were never read by the worker.
        read = [p for p in joined if p.request_id in named]
        unread = [p for p in joined if p.request_id not in named]
        joined_outcomes = [self._reader.guarded(p, named[p.request_id], reply, reply.run_s, finished, True)
                           for p in read]
        return own + read, [answers[p.request_id] for p in own] + joined_outcomes, unread
