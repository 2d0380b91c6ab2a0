"""Reserving a replica's requests before they run, and settling their outcomes after, each once.

The recorder (the bookkeeper) reserves the service units of requests about
to run in one transaction and may refuse some; it records outcomes (the
charges) before the callers' futures resolve. A request lost with its task
(a :class:`~tpm_fed.errors.SiteError`) is first offered to the rerouter,
which the replica pool supplies (:meth:`tpm_fed.engine.replica_pool.ReplicaPool.reroute`):
one placed again keeps its reservation and gets its second try's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from tpm_fed.engine.pending import Pending, pass_on, resolve
from tpm_fed.engine.reply import Outcome
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult

logger = logging.getLogger(__name__)


class SettlementRecorder(Protocol):
    """Told when a batch leaves, and of its outcomes before the callers' futures resolve."""

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> dict[str, BaseException]:
        """Record the batch about to leave; return the requests refused (not sent), with why."""
        ...

    def record_outcomes(self, outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
        """Record the outcomes; return them, results annotated (e.g. with their charge)."""
        ...


Rerouter = Callable[[list[tuple[ServingRequest, BaseException]], ModelSpec], "dict[str, Future[ServedResult]]"]
"""Given the requests of a lost task (each with why) and the model version they were to run
on: the future of a second try for each request it places again, by request id (the others fail)."""


class Settlement:
    """Reservations and outcomes of one replica's requests (``site``, model version ``spec``)."""

    def __init__(self, site: str, spec: ModelSpec, recorder: SettlementRecorder | None, rerouter: Rerouter | None) -> None:
        self.site, self.spec, self.recorder, self.rerouter = site, spec, recorder, rerouter

    def reserve(self, pending: list[Pending]) -> dict[str, BaseException]:
        """Reserve and log the requests not recorded yet; those refused, with why (raises if the ledger
        or the log could not take them at all)."""
        fresh = [p for p in pending if not p.recorded]
        refused = self.recorder.record_sent(self.site, self.spec.version, [p.request for p in fresh]) \
            if self.recorder is not None and fresh else {}
        for p in fresh:
            p.recorded = p.request_id not in refused
        return refused or {}

    def settle(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        """Record outcomes and give them to their callers (a request lost with its site may be placed again)."""
        if not batch:
            return
        batch, outcomes = self._reroute(batch, outcomes)
        outcomes = self._record(batch, outcomes)
        for pending, outcome in zip(batch, outcomes, strict=True):
            resolve(pending.future, outcome)

    def _reroute(self, batch: list[Pending], outcomes: list[Outcome]) -> tuple[list[Pending], list[Outcome]]:
        """Offer the requests lost with their task to the rerouter; the rest, with their outcomes."""
        lost = [(p.request, o) for p, o in zip(batch, outcomes, strict=True) if isinstance(o, SiteError)]
        if self.rerouter is None or not lost:
            return batch, outcomes
        try:
            second_tries = self.rerouter(lost, self.spec)
        except Exception:  # the first failure stands
            logger.exception("could not place %d lost requests again", len(lost))
            second_tries = {}
        kept: list[tuple[Pending, Outcome]] = []
        for pending, outcome in zip(batch, outcomes, strict=True):
            second_try = second_tries.get(pending.request_id)
            if second_try is None:
                kept.append((pending, outcome))
            else:
                second_try.add_done_callback(lambda done, caller=pending.future: pass_on(done, caller))
        return [p for p, _ in kept], [o for _, o in kept]

    def _record(self, batch: list[Pending], outcomes: list[Outcome]) -> list[Outcome]:
        if self.recorder is None:
            return outcomes
        try:
            recorded = self.recorder.record_outcomes(
                {p.request_id: outcome for p, outcome in zip(batch, outcomes, strict=True)})
            return [recorded[p.request_id] for p in batch]
        except Exception:  # a bookkeeping failure must not hang or drop the answers
            logger.exception("could not record the outcomes of %d requests", len(batch))
            return outcomes
