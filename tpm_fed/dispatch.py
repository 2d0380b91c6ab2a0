"""Coalesce requests for one replica into batches, one task per batch.

An endpoint worker runs one task at a time, so requests must be batched
before they become tasks. While every worker is busy, the dispatcher gathers
the requests that arrive; when a batch comes back, everything that gathered
goes out together as the next task, so batches grow with load (continuous
batching at task granularity). When a worker is free, requests linger
until none has arrived for ``linger_s`` (about a millisecond; at most
``MAX_LINGER_FACTOR`` times that): a burst of requests then leaves as one
batch instead of one request followed by the rest.

When a batch leaves, its listener (the bookkeeper) reserves the service
units of all its requests in one transaction; a request it refuses fails at
once and the rest go out. Lingers and task timeouts run on one thread per
dispatcher (no thread is started per batch).

A batch that gets no answer within ``task_timeout_s`` fails with
:class:`~tpm_fed.errors.SiteError` (its service units are released and the
site is marked unhealthy), so a lost task never leaves a caller waiting
forever; an answer that arrives after that is dropped.

A task whose worker can take more in while it runs (a vLLM replica with a
back channel to this service) *admits* requests: while it runs, the
worker's asks for more (:meth:`tpm_fed.service.stream_hub.StreamHub.admit`)
hand it requests waiting here, reserved as a batch would be: every
interactive one, and batch lines while fewer than ``max_batch`` run, for
``admit_for_s`` after the task began (so a busy replica's task still
ends). Each of its requests, joined or not, is settled as soon as the
worker answers it on the back channel, or when the task ends, whichever
comes first: exactly once. One handed over that the worker never read goes
back to the front of the queue, still reserved, for the next task.

A batch lost to its site (the task failed with a ``SiteError``: worker lost,
endpoint gone, no answer in time) may be given to a ``rerouter``, which
places each request again elsewhere and returns the future of that second
try; what it does not take fails as above. A reply is read defensively: a
malformed, truncated or mismatched one fails the requests it does not answer
properly with :class:`~tpm_fed.errors.RemoteExecutionError`, and the
dispatcher goes on serving.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tpm_fed.protocol.errors import RemoteExecutionError, SiteError, error_from_wire
from tpm_fed.protocol.limits import ENVELOPE_BYTES, MAX_PAYLOAD_BYTES, request_bytes
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.entrypoints import SERVE_BATCH
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.results import ReplicaInfo, ServedResult, Timings
from tpm_fed.sites.base import Site

logger = logging.getLogger(__name__)


MAX_LINGER_FACTOR = 25
"""A steady trickle of requests cannot hold a batch back longer than this many lingers
(a burst of 64 requests, each placed in ~0.2-0.3 ms, must fit inside it; a full batch
leaves at once anyway)."""


MAX_HOLD_S = 2.0
"""The longest a burst being placed may hold a batch back (see ``held``)."""


ADMIT_FOR_S = 30.0
"""How long after it began a running task may take in requests (at most a quarter of the task timeout)."""

JOINS = frozenset({"generate"})
"""Request kinds that may join a running task (a vLLM engine takes them between steps)."""


class Listener(Protocol):
    """Told when a batch leaves, and of its outcomes before the callers' futures resolve."""

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> dict[str, BaseException]:
        """Record the batch about to leave; return the requests refused (not sent), with why."""
        ...

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException]
    ) -> dict[str, ServedResult | BaseException]:
        """Record the outcomes; return them, results annotated (e.g. with their charge)."""
        ...


Rerouter = Callable[[list[tuple[ServingRequest, BaseException]], ModelSpec], "dict[str, Future[ServedResult]]"]
"""Given the requests of a lost task (each with why) and the model version they were to run
on: the future of a second try for each request it places again, by request id (the others fail)."""


class _Timed:
    """A callback due at ``when`` (``time.monotonic``); :meth:`cancel` keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[_Timed], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: _Timed) -> bool:
        return self.when < other.when


class _Clock:
    """One thread that runs a dispatcher's timed callbacks: lingers and task timeouts.

    A ``threading.Timer`` starts a thread: ~0.1 ms, twice per batch, on the
    path of every request. This thread is started once, waits on a condition
    for the earliest deadline, and exits after a minute with nothing to do.
    """

    IDLE_S = 60.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._due: list[_Timed] = []
        self._condition = threading.Condition()
        self._running = False
        self._compact_at = 64

    def call_later(self, delay: float, callback: Callable[[_Timed], None]) -> _Timed:
        """Run ``callback(timed)`` on the clock's thread in ``delay`` seconds."""
        timed = _Timed(time.monotonic() + delay, callback)
        with self._condition:
            if len(self._due) >= self._compact_at:  # cancelled task timeouts pile up: drop them
                self._due = [t for t in self._due if not t.cancelled]
                heapq.heapify(self._due)
                self._compact_at = max(64, 2 * len(self._due))
            heapq.heappush(self._due, timed)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
            elif self._due[0] is timed:
                self._condition.notify()
        return timed

    def _run(self) -> None:
        while (timed := self._next()) is not None:
            try:
                timed.callback(timed)
            except Exception:
                logger.exception("a timed callback of %s failed", self._name)

    def _next(self) -> _Timed | None:
        with self._condition:
            while True:
                while self._due and self._due[0].cancelled:
                    heapq.heappop(self._due)
                if not self._due:
                    if not self._condition.wait(self.IDLE_S) and not self._due:
                        self._running = False
                        return None
                    continue
                delay = self._due[0].when - time.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._due)
                self._condition.wait(delay)


@dataclass
class _Pending:
    request: ServingRequest
    future: Future[ServedResult]
    submitted: float = field(default_factory=time.perf_counter)
    nbytes: int = 0
    recorded: bool = False  # reserved and logged as sent (once; a request handed back keeps both)


@dataclass
class _Batch:
    """One task's requests; closed exactly once, by its answer or by its timeout.

    ``joined`` are the requests that joined it while it ran; ``answered`` those of either kind
    already settled (by an early answer, or by whoever closed the batch).
    """

    pending: list[_Pending]
    closed: bool = False
    timer: _Timed | None = None
    admitting: bool = False
    started: float = field(default_factory=time.monotonic)
    joined: list[_Pending] = field(default_factory=list)
    joining: int = 0  # handed over, being reserved
    answered: set[str] = field(default_factory=set)

    @property
    def running(self) -> int:
        return len(self.pending) + len(self.joined) + self.joining - len(self.answered)

    def member(self, request_id: str) -> _Pending | None:
        return next((p for p in (*self.pending, *self.joined) if p.request.request_id == request_id), None)

    def claim_unanswered(self) -> tuple[list[_Pending], list[_Pending]]:
        """Called under the dispatcher's lock: the requests not yet settled (its own, joined), now claimed."""
        own = [p for p in self.pending if p.request.request_id not in self.answered]
        joined = [p for p in self.joined if p.request.request_id not in self.answered]
        self.answered.update(p.request.request_id for p in (*own, *joined))
        return own, joined


class _Admitting:
    """A running task's hooks for the back channel (:class:`tpm_fed.service.stream_hub.Admitting`)."""

    def __init__(self, dispatcher: BatchingDispatcher, batch: _Batch) -> None:
        self.dispatcher, self.batch = dispatcher, batch

    def admit(self, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        return self.dispatcher._admit(self.batch, wait_s)

    def stop_admitting(self) -> None:
        self.dispatcher._stop_admitting(self.batch)

    def answered(self, served: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
        self.dispatcher._answered(self.batch, served, outcomes)


class BatchingDispatcher:
    """Sends one model version's requests to one site, batching under load.

    Args:
        site: Where the serving function runs.
        spec: The model version every request here uses.
        max_batch: Most requests in one task.
        max_in_flight: Tasks outstanding at once (the site's worker count).
        linger_s: Quiet time that ends a linger when a worker is free (0 sends at once).
        task_timeout_s: A task unanswered for this long fails its requests (None: wait forever).
        listener: Told of each outcome before its future resolves.
        rerouter: Offered each request of a batch lost to its site (see :data:`Rerouter`).
        context: What the site allows, passed to the serving function (see
            :func:`functions.serve.serve_batch`).
        streams: Returns the hub that gives a task a back channel for its streamed requests
            and closes it when the task ends (:class:`tpm_fed.service.stream_hub.StreamHub`;
            None while no service listens).
        held: True while a caller is placing a burst it wants to leave together (a batch's window
            of lines): a linger then lasts until the burst is placed (at most :data:`MAX_HOLD_S`);
            a full batch still leaves at once. See :meth:`nudge`.
        admit_for_s: How long after it began a running task may take in waiting requests
            (:data:`ADMIT_FOR_S` by default, at most a quarter of ``task_timeout_s``; 0: never).
    """

    def __init__(
        self,
        site: Site,
        spec: ModelSpec,
        *,
        max_batch: int,
        max_in_flight: int,
        linger_s: float = 0.0,
        task_timeout_s: float | None = None,
        listener: Listener | None = None,
        context: dict[str, Any] | None = None,
        rerouter: Rerouter | None = None,
        streams: Callable[[], Any] | None = None,
        held: Callable[[], bool] | None = None,
        admit_for_s: float | None = None,
    ) -> None:
        self.site = site
        self.spec = spec
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.linger_s = linger_s
        self.task_timeout_s = task_timeout_s
        self.listener = listener
        self.rerouter = rerouter
        self.streams = streams
        self.held = held
        self.context = context or {}
        if admit_for_s is None:
            admit_for_s = ADMIT_FOR_S if task_timeout_s is None else min(ADMIT_FOR_S, task_timeout_s / 4)
        # Only a vLLM engine takes requests in while it runs ("auto" may be vLLM; torch never asks).
        self.admit_for_s = admit_for_s if spec.backend != "torch" else 0.0
        self._waiting: deque[_Pending] = deque()
        self._background: deque[_Pending] = deque()  # batch lines: they leave after every interactive request
        self._in_flight = 0
        self._linger: _Timed | None = None
        self._linger_started = 0.0
        self._clock = _Clock(f"tpm-dispatch-{site.name}")
        self._last_arrival = 0.0
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # a running task's ask for more waits on it

    @property
    def waiting(self) -> int:
        """Requests queued here that no task carries yet."""
        return len(self._waiting) + len(self._background)

    def position(self, request_id: str) -> int | None:
        """Where a waiting request stands in this queue (1: next to leave), or None if not waiting here."""
        with self._lock:
            for index, pending in enumerate([*self._waiting, *self._background]):
                if pending.request.request_id == request_id:
                    return index + 1
        return None

    def estimated_start_s(self, position: int, service_s: float) -> float:
        """Seconds until the request at ``position`` leaves, for batches taking ``service_s`` each.

        Batches ahead of its own run ``max_in_flight`` at a time; while every
        slot is busy, it also waits for a running batch (counted whole: an
        upper bound, since that batch started some time ago).
        """
        with self._lock:
            busy = self._in_flight >= self.max_in_flight
        batches_ahead = (position - 1) // self.max_batch
        return service_s * (batches_ahead + (1 if busy else 0)) / self.max_in_flight

    def submit(self, request: ServingRequest, nbytes: int | None = None, *,
               background: bool = False) -> Future[ServedResult]:
        """Queue ``request``; ``nbytes`` is its size in a task, if the caller measured it already.

        A ``background`` request (a batch's line) leaves only when no interactive request
        waits here, so a person's request waits at most for the task running now, not for a
        batch's queue.
        """
        pending = _Pending(request, Future(), nbytes=request_bytes(request) if nbytes is None else nbytes)
        with self._lock:
            (self._background if background else self._waiting).append(pending)
            self._last_arrival = pending.submitted
            self._arrival.notify_all()
            if self.linger_s > 0 and self.waiting < self.max_batch:
                self._arm_linger()
                batch = []
            else:
                batch = self._take_batch()
        if batch:
            self._send(batch)
        return pending.future

    def _arm_linger(self, delay: float | None = None) -> None:
        """Called under the lock: check back in ``delay`` unless busy or already armed."""
        if self._linger is None and self._in_flight < self.max_in_flight:
            if delay is None:
                self._linger_started = time.perf_counter()
            self._linger = self._clock.call_later(delay or self.linger_s, self._linger_over)

    def _linger_over(self, timed: _Timed) -> None:
        with self._lock:
            if self._linger is not timed:  # cancelled after it came due
                return
            self._linger = None
            now = time.perf_counter()
            quiet_until = self._last_arrival + self.linger_s
            deadline = self._linger_started + MAX_LINGER_FACTOR * self.linger_s
            if self.held is not None and self.held() and now < self._linger_started + MAX_HOLD_S:
                deadline = self._linger_started + MAX_HOLD_S  # a burst is still being placed: wait for it
                quiet_until = max(quiet_until, now + self.linger_s)
            if now < quiet_until and now < deadline:  # still arriving: wait a little more
                self._arm_linger(min(quiet_until, deadline) - now)
                return
            batch = self._take_batch()
        if batch:
            self._send(batch)

    def nudge(self) -> None:
        """A burst was placed: let what waits leave (after the usual short linger)."""
        with self._lock:
            if self.waiting:
                self._arm_linger()

    def _take_batch(self) -> list[_Pending]:
        """Called under the lock: the next batch, if a worker is free."""
        if self._in_flight >= self.max_in_flight or not self.waiting:
            return []
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._in_flight += 1
        queue = self._waiting or self._background  # interactive requests first
        batch = [queue.popleft()]
        nbytes = batch[0].nbytes
        # Fill up to max_batch requests, and to what one task may carry: interactive ones, then batch lines.
        while (queue := self._waiting or self._background) and len(batch) < self.max_batch:
            if nbytes + queue[0].nbytes > MAX_PAYLOAD_BYTES - ENVELOPE_BYTES:
                break
            nbytes += queue[0].nbytes
            batch.append(queue.popleft())
        return batch

    def _send(self, pending: list[_Pending]) -> None:
        """Send ``pending`` as one task, on the worker slot :meth:`_take_batch` took for it.

        The slot is given back on every path, by structure rather than path by path: a started
        task owns it (the task's end gives it back, :meth:`_finish`); when every request was
        refused at reservation it passes to the next batch; anything unforeseen here fails the
        batch's requests and gives it back. With one worker a slot kept is a replica stalled for
        good, every later request waiting forever.
        """
        while pending:
            try:
                started = self._reserve_and_start(pending)
            except Exception as error:  # a bug, not a refusal: the requests fail typed, the slot comes back
                logger.exception("could not send a batch of %d requests", len(pending))
                with self._lock:
                    self._in_flight -= 1
                for p in pending:
                    _resolve(p.future, error)
                return
            pending = [] if started else self._give_back_slot()

    def _reserve_and_start(self, pending: list[_Pending]) -> bool:
        """Reserve ``pending`` and start the task of those not refused; False if none was left to start."""
        try:
            refused = self._record_sent(pending)
        except Exception as error:  # the log or the ledger could not take the batch
            self._start(pending, failed=error)
            return True
        for p in pending:  # refused at reservation: they fail now (a caller may have cancelled meanwhile)
            if p.request.request_id in refused:
                _resolve(p.future, refused[p.request.request_id])
        kept = [p for p in pending if p.request.request_id not in refused]
        if kept:
            self._start(kept)
        return bool(kept)

    def _give_back_slot(self) -> list[_Pending]:
        """A worker slot is free again: the next batch, which takes it, if any waits."""
        with self._lock:
            self._in_flight -= 1
            return self._take_batch()

    def _record_sent(self, pending: list[_Pending]) -> dict[str, BaseException]:
        """Reserve and log the requests not recorded yet; those refused, with why."""
        fresh = [p for p in pending if not p.recorded]
        refused = self.listener.record_sent(self.site.name, self.spec.version, [p.request for p in fresh]) \
            if self.listener is not None and fresh else {}
        for p in fresh:
            p.recorded = p.request.request_id not in refused
        return refused or {}

    def _start(self, pending: list[_Pending], failed: Exception | None = None) -> None:
        """Run ``pending`` as one task on the slot taken for it (``failed``: as a task that failed so).

        Never raises: whatever goes wrong before the task is out (the back channel, the timer, the
        site) becomes the task's failure, so its end (:meth:`_on_done`) settles the requests and
        gives the slot back, as for any other task.
        """
        batch = _Batch(pending)
        task: Future = Future()
        hub = stream = None
        try:
            if failed is not None:
                raise failed
            if self.task_timeout_s is not None:
                batch.timer = self._clock.call_later(self.task_timeout_s, lambda _: self._expire(batch))
            context = self.context
            hub = self.streams() if self.streams is not None else None
            admitting = _Admitting(self, batch) if self.admit_for_s > 0 else None
            stream = hub.open([p.request.request_id for p in pending], admitting) if hub is not None else None
            if stream is not None:
                context = {**context, "stream": stream}
                batch.admitting = admitting is not None
            task = self.site.submit(SERVE_BATCH, self.spec.to_wire(), [p.request.to_wire() for p in pending],
                                    context)
        except Exception as error:  # the task could not be started
            task = Future()
            task.set_exception(error)
        if stream is not None:
            task.add_done_callback(lambda _: hub.close(stream["token"]))
        task.add_done_callback(lambda done: self._on_done(batch, done))

    def _close(self, batch: _Batch) -> bool:
        """Claim the batch for whoever closes it first: its answer or its timeout."""
        with self._lock:
            if batch.closed:
                return False
            batch.closed = True
            batch.admitting = False
            self._arrival.notify_all()  # an ask for more held open for it ends now
        if batch.timer is not None:
            batch.timer.cancel()
        return True

    def _expire(self, batch: _Batch) -> None:
        if not self._close(batch):
            return
        error = SiteError(
            f"site {self.site.name!r} gave no answer within {self.task_timeout_s:g} s "
            f"(task_timeout_s); the requests were not charged"
        )
        with self._lock:
            own, joined = batch.claim_unanswered()
        self._finish(own + joined, [error] * (len(own) + len(joined)))

    def _on_done(self, batch: _Batch, done: Future) -> None:
        if not self._close(batch):
            logger.warning("a batch of %d requests answered after its timeout; dropped", len(batch.pending))
            return
        with self._lock:
            own, joined = batch.claim_unanswered()
        try:
            settled, outcomes, unread = self._task_outcomes(batch, own, joined, done)
        except Exception as error:  # a reply no check foresaw: its requests fail typed, the slot still comes back
            settled, unread = own + joined, []
            outcomes = [self._malformed(f"{type(error).__name__}: {error}")] * len(settled)
        if unread:  # handed over as the task ended, never read: back to the front, still reserved
            with self._lock:
                self._waiting.extendleft(reversed(unread))
        self._finish(settled, outcomes)

    def _task_outcomes(self, batch: _Batch, own: list[_Pending], joined: list[_Pending], done: Future
                       ) -> tuple[list[_Pending], list[ServedResult | BaseException], list[_Pending]]:
        """The requests the ended task settles, their outcomes, and the joined ones it never read."""
        try:
            reply = done.result()
        except Exception as error:
            return own + joined, [error] * (len(own) + len(joined)), []
        everything = dict(zip([p.request.request_id for p in batch.pending],
                              self._read_reply(batch.pending, reply), strict=True))
        joined, unread = self._split_joined(joined, reply)
        return own + joined, [everything[p.request.request_id] for p in own] + self._read_joined(joined, reply), unread

    def _finish(self, batch: list[_Pending], outcomes: list[ServedResult | BaseException]) -> None:
        """The task ended: settle what it had not answered yet, and free its worker slot."""
        # Whatever goes wrong below, the worker slot comes back: a lost slot stalls the replica for good.
        try:
            self._settle(batch, outcomes)
        finally:
            follow_up = self._give_back_slot()
            if follow_up:
                self._send(follow_up)

    def _settle(self, batch: list[_Pending], outcomes: list[ServedResult | BaseException]) -> None:
        """Record outcomes and give them to their callers (a request lost with its site may be placed again)."""
        if not batch:
            return
        batch, outcomes = self._reroute(batch, outcomes)
        outcomes = self._record(batch, outcomes)
        for pending, outcome in zip(batch, outcomes, strict=True):
            _resolve(pending.future, outcome)

    def _admit(self, batch: _Batch, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """Requests waiting here that join the running ``batch`` (see :class:`_Admitting`)."""
        deadline = time.monotonic() + wait_s
        with self._arrival:
            while True:
                if not batch.admitting or time.monotonic() - batch.started > self.admit_for_s:
                    return [], False
                taken = self._take_joining(self.max_batch - batch.running)
                if taken:
                    batch.joining += len(taken)
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], True
                self._arrival.wait(remaining)
        try:  # reserved before the worker sees them, as a batch is before it leaves
            refused = self._record_sent(taken)
        except Exception as error:  # the log or the ledger could not take them
            refused = {p.request.request_id: error for p in taken}
        for pending in taken:
            if pending.request.request_id in refused:
                _resolve(pending.future, refused[pending.request.request_id])
        kept = [p for p in taken if p.request.request_id not in refused]
        with self._lock:
            batch.joining -= len(taken)
            ended = batch.closed  # it timed out meanwhile: these never reach it
            if not ended:
                batch.joined.extend(kept)
        if ended:
            self._settle(kept, [SiteError(f"the task on site {self.site.name!r} these requests were to join ended "
                                          "first; they were not charged")] * len(kept))
            return [], False
        return [p.request.to_wire() for p in kept], True

    def _take_joining(self, room: int) -> list[_Pending]:
        """Called under the lock: the waiting requests that may join a running task. Every interactive
        one (the engine's own scheduler bounds what runs at once, as in vLLM's server), then batch
        lines up to ``room``; the rest keep their places."""
        taken: list[_Pending] = []
        for queue, limit in ((self._waiting, None), (self._background, room)):
            if not any(p.request.kind in JOINS for p in queue):
                continue
            staying: deque[_Pending] = deque()
            while queue:
                pending = queue.popleft()
                fits = limit is None or len(taken) < limit
                (taken if fits and pending.request.kind in JOINS else staying).append(pending)
            queue.extend(staying)
        return taken

    def _stop_admitting(self, batch: _Batch) -> None:
        with self._arrival:
            batch.admitting = False
            self._arrival.notify_all()

    def _answered(self, batch: _Batch, served: dict[str, Any], answers: dict[str, dict[str, Any]]) -> None:
        """Settle the requests a running task answered early (each once; the task's end skips them)."""
        finished = time.perf_counter()
        with self._lock:
            fresh = [(pending, answer) for rid, answer in answers.items()
                     if rid not in batch.answered and (pending := batch.member(rid)) is not None]
            batch.answered.update(p.request.request_id for p, _ in fresh)
            joined = {id(p) for p in batch.joined}
            if fresh:
                self._arrival.notify_all()  # room for more to join
        if not fresh:
            return
        shared = self._shared({**served, "run_s": 0.0})
        outcomes = [self._guarded(pending, answer, shared, finished, id(pending) in joined)
                    for pending, answer in fresh]
        self._settle([p for p, _ in fresh], outcomes)

    @staticmethod
    def _split_joined(joined: list[_Pending], reply: Any) -> tuple[list[_Pending], list[_Pending]]:
        """The joined requests the task's reply answers, and those it does not name: the worker never
        read them (an ask's answer that arrived as the task ended, or was lost on the way)."""
        answers = reply.get("joined") if isinstance(reply, dict) else None
        answers = answers if isinstance(answers, dict) else {}
        named = [p for p in joined if p.request.request_id in answers]
        return named, [p for p in joined if p.request.request_id not in answers]

    def _read_joined(self, joined: list[_Pending], reply: Any) -> list[ServedResult | BaseException]:
        """Outcomes of requests that joined the task, from its reply's ``joined`` (each one named there)."""
        if not joined:
            return []
        shared, finished = self._shared(reply), time.perf_counter()
        return [self._guarded(p, reply["joined"][p.request.request_id], shared, finished, True) for p in joined]

    def _reroute(
        self, batch: list[_Pending], outcomes: list[ServedResult | BaseException]
    ) -> tuple[list[_Pending], list[ServedResult | BaseException]]:
        """Offer the requests lost with their task to the rerouter; the rest, with their outcomes."""
        lost = [(p.request, o) for p, o in zip(batch, outcomes, strict=True) if isinstance(o, SiteError)]
        if self.rerouter is None or not lost:
            return batch, outcomes
        try:
            second_tries = self.rerouter(lost, self.spec)
        except Exception:  # the first failure stands
            logger.exception("could not place %d lost requests again", len(lost))
            second_tries = {}
        kept: list[tuple[_Pending, ServedResult | BaseException]] = []
        for pending, outcome in zip(batch, outcomes, strict=True):
            second_try = second_tries.get(pending.request.request_id)
            if second_try is None:
                kept.append((pending, outcome))
            else:
                second_try.add_done_callback(lambda done, caller=pending.future: _pass_on(done, caller))
        return [p for p, _ in kept], [o for _, o in kept]

    def _read_reply(self, batch: list[_Pending], reply: Any) -> list[ServedResult | BaseException]:
        """One outcome per request; what the reply does not answer properly fails typed, alone."""
        finished = time.perf_counter()
        try:
            answers = reply["outcomes"]
            if not isinstance(answers, list):
                raise TypeError(f"outcomes is a {type(answers).__name__}, not a list")
            if len(answers) != len(batch):
                raise ValueError(f"{len(answers)} outcomes for a batch of {len(batch)} requests")
        except Exception as error:  # nothing in it can be matched to a request
            failure = self._malformed(f"{type(error).__name__}: {error}")
            return [failure] * len(batch)
        shared = self._shared(reply)
        return [self._guarded(pending, answer, shared, finished) for pending, answer in zip(batch, answers)]

    @staticmethod
    def _shared(reply: dict[str, Any]) -> dict[str, Any] | Exception:
        """What the replica reports for all its answers (an error if it is malformed)."""
        try:  # a batch refused whole (e.g. a code version mismatch) has no replica: only results need it
            return {"backend": reply["backend"], "replica": ReplicaInfo.from_wire(reply["replica"]),
                    "load_s": float(reply["load_s"]), "run_s": float(reply["run_s"]),
                    "notes": reply.get("notes", [])}
        except Exception as error:
            return error

    def _guarded(self, pending: _Pending, answer: Any, shared: dict[str, Any] | Exception, finished: float,
                 joined: bool = False) -> ServedResult | BaseException:
        """The request's outcome; an answer that is not one fails it typed, alone."""
        try:
            return self._outcome(pending, answer, shared, finished, joined)
        except Exception as error:
            return self._malformed(f"the answer to request {pending.request.request_id}: "
                                   f"{type(error).__name__}: {error}")

    def _outcome(self, pending: _Pending, answer: Any, shared: dict[str, Any] | Exception, finished: float,
                 joined: bool = False) -> ServedResult | BaseException:
        if "error" in answer:
            error = answer["error"]
            if not isinstance(error, dict):
                raise TypeError(f"error is a {type(error).__name__}, not an object")
            return error_from_wire(error)
        if isinstance(shared, Exception):
            raise shared
        replica, load_s, run_s = shared["replica"], shared["load_s"], shared["run_s"]
        if "run_s" in answer:  # answered on its own: its own time in the engine
            run_s = float(answer["run_s"])
        if joined:  # it joined a replica already loaded: no cold start is its doing
            replica, load_s = replica.model_copy(update={"warm": True}), 0.0
        elapsed = finished - pending.submitted
        return KINDS[pending.request.kind].result.model_validate({
            **answer["result"],
            "request_id": pending.request.request_id,
            "model": self.spec.name,
            "version": self.spec.version,
            "backend": shared["backend"],
            "site": self.site.name,
            "replica": replica,
            "timings": Timings(queue_s=max(0.0, elapsed - load_s - run_s), load_s=load_s, run_s=run_s),
            "notes": shared["notes"],
        })

    def _malformed(self, what: str) -> RemoteExecutionError:
        return RemoteExecutionError(f"site {self.site.name!r} sent a malformed reply ({what[:500]}); "
                                    "the request was not charged")

    def _record(
        self, batch: list[_Pending], outcomes: list[ServedResult | BaseException]
    ) -> list[ServedResult | BaseException]:
        if self.listener is None:
            return outcomes
        try:
            recorded = self.listener.record_outcomes(
                {p.request.request_id: outcome for p, outcome in zip(batch, outcomes, strict=True)}
            )
            return [recorded[p.request.request_id] for p in batch]
        except Exception:  # a bookkeeping failure must not hang or drop the answers
            logger.exception("could not record the outcomes of %d requests", len(batch))
            return outcomes


def _pass_on(done: Future, caller: Future) -> None:
    """The second try's outcome becomes the caller's."""
    if done.cancelled():
        caller.cancel()
        return
    error = done.exception()
    _resolve(caller, error if error is not None else done.result())


def _resolve(future: Future, outcome: Any) -> None:
    """Give a caller its outcome; one who cancelled meanwhile does not keep the others from theirs."""
    if future.done():  # cancelled by its caller while the batch ran
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled between the check and now
        pass
