"""One replica's queue and its decisions: what leaves as a task, what joins a running one, when.

No threads, no lock, no clock: every decision takes ``now`` and returns what
to do (a batch to send on a worker slot it took, requests to hand to a running
task) and where the queue's linger stands (:attr:`ReplicaQueue.linger_at`,
when to look again). The dispatcher (:mod:`tpm_fed.engine.dispatcher`) calls
it under its lock and acts on the answers; tests call it with made-up times.

An endpoint worker runs one task at a time, so requests are batched before
they become tasks. While every worker is busy, arrivals gather; when a slot
comes back they leave together, so batches grow with load. When a worker is
free, requests linger until none has arrived for ``linger_s`` (at most
:data:`MAX_LINGER_FACTOR` lingers; :data:`MAX_HOLD_S` while a caller holds a
burst): a burst leaves as one batch, not one request and then the rest.
Interactive requests leave before batch lines (``background``).
"""

from __future__ import annotations

from collections import deque

from tpm_fed.engine.pending import Pending
from tpm_fed.protocol.limits import ENVELOPE_BYTES, MAX_PAYLOAD_BYTES

MAX_LINGER_FACTOR = 25
"""A steady trickle of requests cannot hold a batch back longer than this many lingers
(a burst of 64 requests, each placed in ~0.2-0.3 ms, must fit inside it; a full batch
leaves at once anyway)."""

MAX_HOLD_S = 2.0
"""The longest a burst being placed may hold a batch back (see :meth:`ReplicaQueue.linger_over`)."""



class ReplicaQueue:
    """Requests waiting for one replica, and its worker slots (tasks out at once)."""

    def __init__(self, *, max_batch: int, max_in_flight: int, linger_s: float = 0.0,
                 joins: frozenset[str] = frozenset()) -> None:
        self.max_batch, self.max_in_flight, self.linger_s = max_batch, max_in_flight, linger_s
        self.joins = joins  # the request kinds that may join a task running on this replica
        self.interactive: deque[Pending] = deque()
        self.background: deque[Pending] = deque()  # batch lines: they leave after every interactive request
        self.in_flight = 0
        self.linger_at: float | None = None  # when a linger ends (None: not lingering)
        self._linger_started = 0.0
        self._last_arrival = 0.0

    @property
    def waiting(self) -> int:
        """Requests queued that no task carries yet."""
        return len(self.interactive) + len(self.background)

    @property
    def busy(self) -> bool:
        return self.in_flight >= self.max_in_flight

    def arrive(self, pending: Pending, now: float, background: bool = False) -> list[Pending]:
        """Queue ``pending``; the batch to send now (on a slot taken for it), if one should leave."""
        (self.background if background else self.interactive).append(pending)
        self._last_arrival = now
        if self.linger_s > 0 and self.waiting < self.max_batch:
            self._linger(now)
            return []
        return self.take_batch()

    def linger_over(self, now: float, held: bool) -> list[Pending]:
        """The linger came due: the batch that leaves now, or none (lingering on while requests still
        arrive, or while ``held``: a caller is placing a burst that should leave together)."""
        self.linger_at = None
        quiet_until = self._last_arrival + self.linger_s
        deadline = self._linger_started + MAX_LINGER_FACTOR * self.linger_s
        if held and now < self._linger_started + MAX_HOLD_S:
            deadline = self._linger_started + MAX_HOLD_S
            quiet_until = max(quiet_until, now + self.linger_s)
        if now < quiet_until and now < deadline:  # still arriving: wait a little more
            self._linger(now, until=min(quiet_until, deadline))
            return []
        return self.take_batch()

    def nudge(self, now: float) -> None:
        """A burst was placed: what waits leaves after the usual short linger."""
        if self.waiting:
            self._linger(now)

    def _linger(self, now: float, until: float | None = None) -> None:
        if self.linger_at is None and not self.busy:
            if until is None:
                self._linger_started = now
            self.linger_at = until if until is not None else now + self.linger_s

    def take_batch(self) -> list[Pending]:
        """The next batch, on a worker slot it takes, if one is free: interactive requests first, then
        batch lines, up to ``max_batch`` and to what one task may carry."""
        if self.busy or not self.waiting:
            return []
        self.linger_at = None
        self.in_flight += 1
        queue = self.interactive or self.background
        batch = [queue.popleft()]
        nbytes = batch[0].nbytes
        while (queue := self.interactive or self.background) and len(batch) < self.max_batch:
            if nbytes + queue[0].nbytes > MAX_PAYLOAD_BYTES - ENVELOPE_BYTES:
                break
            nbytes += queue[0].nbytes
            batch.append(queue.popleft())
        return batch

    def free_slot(self) -> list[Pending]:
        """A worker slot came back: the next batch, which takes it, if any waits."""
        self.in_flight -= 1
        return self.take_batch()

    def take_joining(self, room: int) -> list[Pending]:
        """Waiting requests that join a running task: every interactive one of a kind that joins (the
        engine's own scheduler bounds what runs at once, as in vLLM's server), then batch lines up to
        ``room``; the rest keep their places."""
        taken: list[Pending] = []
        for queue, limit in ((self.interactive, None), (self.background, room)):
            if not any(p.request.kind in self.joins for p in queue):
                continue
            staying: deque[Pending] = deque()
            while queue:
                pending = queue.popleft()
                fits = limit is None or len(taken) < limit
                (taken if fits and pending.request.kind in self.joins else staying).append(pending)
            queue.extend(staying)
        return taken

    def hand_back(self, unread: list[Pending]) -> None:
        """Requests handed to a task that ended before reading them: first in line again."""
        self.interactive.extendleft(reversed(unread))

    def lend(self, count: int) -> list[Pending]:
        """Up to ``count`` batch lines another replica with a free worker may take, from the back of the line
        (those this one would run last), while every worker here is busy (a free one takes them itself).
        Only lines not reserved yet (a reserved one belongs to this replica's site), whose caller named no
        site and that run none of the caller's code (the broker would not move them anyway)."""
        if not self.busy or count <= 0:
            return []
        lent: deque[Pending] = deque()
        kept: deque[Pending] = deque()
        while self.background:
            pending = self.background.pop()
            movable = not pending.recorded and pending.request.site is None and not pending.request.runs_user_code
            (lent if len(lent) < count and movable else kept).appendleft(pending)
        self.background = kept
        return list(lent)

    def adopt(self, pendings: list[Pending]) -> None:
        """Batch lines taken from another replica's queue (or given back to this one): last in line."""
        self.background.extend(pendings)

    def position(self, request_id: str) -> int | None:
        """Where a waiting request stands (1: next to leave), or None if not waiting here."""
        for index, pending in enumerate([*self.interactive, *self.background]):
            if pending.request_id == request_id:
                return index + 1
        return None

    def estimated_start_s(self, position: int, service_s: float) -> float:
        """Seconds until the request at ``position`` leaves, for tasks taking ``service_s`` each: the
        batches ahead of it run ``max_in_flight`` at a time, after a running one while every slot is busy
        (counted whole: an upper bound)."""
        batches_ahead = (position - 1) // self.max_batch
        return service_s * (batches_ahead + (1 if self.busy else 0)) / self.max_in_flight
