"""Coalesce requests for one replica into batches, one task per batch.

An endpoint worker runs one task at a time, so requests must be batched
before they become tasks. The dispatcher sends a request at once when a
worker is free (no added latency when idle) and, while every worker is busy,
gathers the requests that arrive; when a batch comes back, everything that
gathered goes out together as the next task. Batching then grows with load,
like continuous batching at task granularity.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from tpm_fed.errors import error_from_wire
from tpm_fed.models.spec import ModelSpec
from tpm_fed.request import GenerationRequest
from tpm_fed.result import Completion, GenerationResult, ReplicaInfo, Timings, Usage
from tpm_fed.sites.base import Site

logger = logging.getLogger(__name__)


class Listener(Protocol):
    """Told about every outcome before the caller's future resolves."""

    def finished(self, result: GenerationResult) -> None: ...

    def failed(self, request_id: str, error: BaseException) -> None: ...


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResult]
    submitted: float = field(default_factory=time.perf_counter)


class BatchingDispatcher:
    """Sends one model version's requests to one site, batching under load.

    Args:
        site: Where the serving function runs.
        spec: The model version every request here uses.
        max_batch: Most requests in one task.
        max_in_flight: Tasks outstanding at once (the site's worker count).
        listener: Told of each outcome before its future resolves.
    """

    def __init__(
        self,
        site: Site,
        spec: ModelSpec,
        *,
        max_batch: int,
        max_in_flight: int,
        listener: Listener | None = None,
    ) -> None:
        self.site = site
        self.spec = spec
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.listener = listener
        self._waiting: deque[_Pending] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        pending = _Pending(request, Future())
        with self._lock:
            self._waiting.append(pending)
            batch = self._take_batch()
        if batch:
            self._send(batch)
        return pending.future

    def _take_batch(self) -> list[_Pending]:
        """Called under the lock: the next batch, if a worker is free."""
        if self._in_flight >= self.max_in_flight or not self._waiting:
            return []
        self._in_flight += 1
        count = min(self.max_batch, len(self._waiting))
        return [self._waiting.popleft() for _ in range(count)]

    def _send(self, batch: list[_Pending]) -> None:
        from functions.serve import generate_batch

        try:
            task = self.site.submit(
                generate_batch, self.spec.to_wire(), [p.request.to_wire() for p in batch]
            )
        except Exception as error:  # the site could not even take the task
            task = Future()
            task.set_exception(error)
        task.add_done_callback(lambda done: self._on_done(batch, done))

    def _on_done(self, batch: list[_Pending], done: Future) -> None:
        try:
            reply = done.result()
        except Exception as error:
            outcomes: list[GenerationResult | BaseException] = [error] * len(batch)
        else:
            outcomes = self._read_reply(batch, reply)
        for pending, outcome in zip(batch, outcomes, strict=True):
            self._resolve(pending, outcome)
        with self._lock:
            self._in_flight -= 1
            follow_up = self._take_batch()
        if follow_up:
            self._send(follow_up)

    def _read_reply(self, batch: list[_Pending], reply: dict[str, Any]) -> list[GenerationResult | BaseException]:
        finished = time.perf_counter()
        outcomes: list[GenerationResult | BaseException] = []
        for pending, outcome in zip(batch, reply["outcomes"], strict=True):
            if "error" in outcome:
                outcomes.append(error_from_wire(outcome["error"]))
                continue
            elapsed = finished - pending.submitted
            load_s, run_s = reply["load_s"], reply["run_s"]
            outcomes.append(
                GenerationResult(
                    request_id=pending.request.request_id,
                    model=self.spec.name,
                    version=self.spec.version,
                    backend=reply["backend"],
                    site=self.site.name,
                    replica=ReplicaInfo.from_wire(reply["replica"]),
                    completions=[Completion.from_wire(c) for c in outcome["result"]["completions"]],
                    usage=Usage.from_wire(outcome["result"]["usage"]),
                    timings=Timings(queue_s=max(0.0, elapsed - load_s - run_s), load_s=load_s, run_s=run_s),
                )
            )
        return outcomes

    def _resolve(self, pending: _Pending, outcome: GenerationResult | BaseException) -> None:
        if self.listener is not None:
            try:
                if isinstance(outcome, GenerationResult):
                    self.listener.finished(outcome)
                else:
                    self.listener.failed(pending.request.request_id, outcome)
            except Exception:  # a bookkeeping failure must not hang or drop the answer
                logger.exception("could not record request %s", pending.request.request_id)
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)
