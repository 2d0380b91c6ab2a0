"""Coalesce requests for one replica into batches, one task per batch.

An endpoint worker runs one task at a time, so requests must be batched
before they become tasks. While every worker is busy, the dispatcher gathers
the requests that arrive; when a batch comes back, everything that gathered
goes out together as the next task, so batches grow with load (continuous
batching at task granularity). When a worker is free, requests linger
until none has arrived for ``linger_s`` (about a millisecond; at most
``MAX_LINGER_FACTOR`` times that): a burst of requests then leaves as one
batch instead of one request followed by the rest.

A batch that gets no answer within ``task_timeout_s`` fails with
:class:`~tpm_fed.errors.SiteError` (its service units are released and the
site is marked unhealthy), so a lost task never leaves a caller waiting
forever; an answer that arrives after that is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from tpm_fed.protocol.errors import SiteError, error_from_wire
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
(a burst of 64 requests, each admitted in ~0.3 ms, must fit inside it; a full batch
leaves at once anyway)."""


class Listener(Protocol):
    """Told when a batch leaves, and of its outcomes before the callers' futures resolve."""

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> None: ...

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException]
    ) -> dict[str, ServedResult | BaseException]:
        """Record the outcomes; return them, results annotated (e.g. with their charge)."""
        ...


@dataclass
class _Pending:
    request: ServingRequest
    future: Future[ServedResult]
    submitted: float = field(default_factory=time.perf_counter)
    nbytes: int = 0


@dataclass
class _Batch:
    """One task's requests; closed exactly once, by its answer or by its timeout."""

    pending: list[_Pending]
    closed: bool = False
    timer: threading.Timer | None = None


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
        context: What the site allows, passed to the serving function (see
            :func:`functions.serve.serve_batch`).
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
    ) -> None:
        self.site = site
        self.spec = spec
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.linger_s = linger_s
        self.task_timeout_s = task_timeout_s
        self.listener = listener
        self.context = context or {}
        self._waiting: deque[_Pending] = deque()
        self._in_flight = 0
        self._linger: threading.Timer | None = None
        self._linger_started = 0.0
        self._last_arrival = 0.0
        self._lock = threading.Lock()

    def submit(self, request: ServingRequest, nbytes: int | None = None) -> Future[ServedResult]:
        """Queue ``request``; ``nbytes`` is its size in a task, if the caller measured it already."""
        pending = _Pending(request, Future(), nbytes=request_bytes(request) if nbytes is None else nbytes)
        with self._lock:
            self._waiting.append(pending)
            self._last_arrival = pending.submitted
            if self.linger_s > 0 and len(self._waiting) < self.max_batch:
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
            self._linger = threading.Timer(delay or self.linger_s, self._linger_over)
            self._linger.daemon = True
            self._linger.start()

    def _linger_over(self) -> None:
        with self._lock:
            self._linger = None
            now = time.perf_counter()
            quiet_until = self._last_arrival + self.linger_s
            deadline = self._linger_started + MAX_LINGER_FACTOR * self.linger_s
            if now < quiet_until and now < deadline:  # still arriving: wait a little more
                self._arm_linger(min(quiet_until, deadline) - now)
                return
            batch = self._take_batch()
        if batch:
            self._send(batch)

    def _take_batch(self) -> list[_Pending]:
        """Called under the lock: the next batch, if a worker is free."""
        if self._in_flight >= self.max_in_flight or not self._waiting:
            return []
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._in_flight += 1
        batch = [self._waiting.popleft()]
        nbytes = batch[0].nbytes
        # Fill up to max_batch requests, and to what one task may carry.
        while self._waiting and len(batch) < self.max_batch:
            if nbytes + self._waiting[0].nbytes > MAX_PAYLOAD_BYTES - ENVELOPE_BYTES:
                break
            nbytes += self._waiting[0].nbytes
            batch.append(self._waiting.popleft())
        return batch

    def _send(self, pending: list[_Pending]) -> None:
        batch = _Batch(pending)
        if self.task_timeout_s is not None:
            batch.timer = threading.Timer(self.task_timeout_s, self._expire, args=(batch,))
            batch.timer.daemon = True
            batch.timer.start()
        try:
            if self.listener is not None:
                self.listener.record_sent(self.site.name, self.spec.version, [p.request for p in pending])
            task = self.site.submit(
                SERVE_BATCH, self.spec.to_wire(), [p.request.to_wire() for p in pending], self.context
            )
        except Exception as error:  # the log or the site could not take the batch
            task = Future()
            task.set_exception(error)
        task.add_done_callback(lambda done: self._on_done(batch, done))

    def _close(self, batch: _Batch) -> bool:
        """Claim the batch for whoever closes it first: its answer or its timeout."""
        with self._lock:
            if batch.closed:
                return False
            batch.closed = True
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
        self._finish(batch.pending, [error] * len(batch.pending))

    def _on_done(self, batch: _Batch, done: Future) -> None:
        if not self._close(batch):
            logger.warning("a batch of %d requests answered after its timeout; dropped", len(batch.pending))
            return
        try:
            reply = done.result()
        except Exception as error:
            outcomes: list[ServedResult | BaseException] = [error] * len(batch.pending)
        else:
            outcomes = self._read_reply(batch.pending, reply)
        self._finish(batch.pending, outcomes)

    def _finish(self, batch: list[_Pending], outcomes: list[ServedResult | BaseException]) -> None:
        outcomes = self._record(batch, outcomes)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        with self._lock:
            self._in_flight -= 1
            follow_up = self._take_batch()
        if follow_up:
            self._send(follow_up)

    def _read_reply(self, batch: list[_Pending], reply: dict[str, Any]) -> list[ServedResult | BaseException]:
        finished = time.perf_counter()
        outcomes: list[ServedResult | BaseException] = []
        for pending, outcome in zip(batch, reply["outcomes"], strict=True):
            if "error" in outcome:
                outcomes.append(error_from_wire(outcome["error"]))
                continue
            elapsed = finished - pending.submitted
            load_s, run_s = reply["load_s"], reply["run_s"]
            payload = outcome["result"]
            outcomes.append(
                KINDS[pending.request.kind].result.model_validate({
                    **payload,
                    "request_id": pending.request.request_id,
                    "model": self.spec.name,
                    "version": self.spec.version,
                    "backend": reply["backend"],
                    "site": self.site.name,
                    "replica": ReplicaInfo.from_wire(reply["replica"]),
                    "timings": Timings(queue_s=max(0.0, elapsed - load_s - run_s), load_s=load_s, run_s=run_s),
                    "notes": reply.get("notes", []),
                })
            )
        return outcomes

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
