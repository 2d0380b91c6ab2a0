"""Reserving a replica's requests before they run, and settling their outcomes after, each once.

The recorder (the bookkeeper) reserves the service units of requests about
to run in one transaction and may refuse some; it records outcomes (the
charges) before the callers' futures resolve. A request lost with its task
(a :class:`~tpm_fed.protocol.errors.SiteError`) is, for a dispatcher the
replica pool made, reported up unrecorded (its future fails with the site
error, its reservation kept): the pool, above the dispatchers as Parsl's
retries are above its executors, places it again or records the failure
(:meth:`tpm_fed.engine.replica_pool.ReplicaPool.submit`).

Where a person waits (any request that is not a batch's line), both
transactions go ahead of the batches' bookkeeping waiting for the database
(:func:`~tpm_fed.state.writing_first`).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from tpm_fed.engine.pending import Pending, resolve
from tpm_fed.engine.reply import Outcome
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.state import writing_first

logger = logging.getLogger(__name__)


class SettlementRecorder(Protocol):
    """Told when a batch leaves, and of its outcomes before the callers' futures resolve."""

    def record_sent(self, site: str, version: str, requests: list[ServingRequest]) -> dict[str, BaseException]:
        """Record the batch about to leave; return the requests refused (not sent), with why."""
        ...

    def record_outcomes(self, outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
        """Record the outcomes; return them, results annotated (e.g. with their charge)."""
        ...


class Settlement:
    """Reservations and outcomes of one replica's requests (``site``, model version ``spec``)."""

    def __init__(self, site: str, spec: ModelSpec, recorder: SettlementRecorder | None,
                 lost_goes_up: bool = False) -> None:
        self.site, self.spec, self.recorder, self.lost_goes_up = site, spec, recorder, lost_goes_up

    def reserve(self, pending: list[Pending]) -> dict[str, BaseException]:
        """Reserve and log the requests not recorded yet; those refused, with why (raises if the ledger
        or the log could not take them at all)."""
        fresh = [p for p in pending if not p.recorded]
        if self.recorder is None or not fresh:
            return {}
        with _first_if_waited_on(fresh):
            refused = self.recorder.record_sent(self.site, self.spec.version, [p.request for p in fresh])
        for p in fresh:
            p.recorded = p.request_id not in refused
        return refused or {}

    def settle(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        """Record outcomes and give them to their callers. With ``lost_goes_up``, a request lost with its
        site is not recorded here: its future fails with the :class:`~tpm_fed.protocol.errors.SiteError`,
        still reserved, for whoever submitted it to place again or settle."""
        if not batch:
            return
        if self.lost_goes_up:
            for pending, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, SiteError):
                    resolve(pending.future, outcome)
            kept = [(p, o) for p, o in zip(batch, outcomes, strict=True) if not isinstance(o, SiteError)]
            batch, outcomes = [p for p, _ in kept], [o for _, o in kept]
        outcomes = self._record(batch, outcomes)
        for pending, outcome in zip(batch, outcomes, strict=True):
            resolve(pending.future, outcome)

    def _record(self, batch: list[Pending], outcomes: list[Outcome]) -> list[Outcome]:
        if self.recorder is None:
            return outcomes
        try:
            with _first_if_waited_on(batch):
                recorded = self.recorder.record_outcomes(
                    {p.request_id: outcome for p, outcome in zip(batch, outcomes, strict=True)})
            return [recorded[p.request_id] for p in batch]
        except Exception:  # a bookkeeping failure must not hang or drop the answers
            logger.exception("could not record the outcomes of %d requests", len(batch))
            return outcomes


def _first_if_waited_on(pending: list[Pending]) -> AbstractContextManager[None]:
    """Ahead of the batches' bookkeeping when a person waits for one of ``pending``."""
    return writing_first() if any(not p.background for p in pending) else nullcontext()
