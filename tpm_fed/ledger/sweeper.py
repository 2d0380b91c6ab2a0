"""Settle or release reservations that nothing else will: the work's record decides which.

A reservation is normally settled (or released) with its batch's outcome, in
the batch's transaction. When that write fails after the work was done, or
the process holding the reservation dies mid-request (a service restart),
the reservation stays held. The bookkeeper then still logs the outcome on
its own where it can (the request log keeps what the work used), so the
sweeper, given the reservations in doubt (:meth:`Ledger.in_doubt`: past
their deadline, or held by a process that is gone), settles each one whose
request is logged done, from the usage logged, and releases the others. The
ledger's conditional transitions make a sweep safe to run anywhere, any
number of times, concurrently with the bookkeeper: each reservation moves
once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from tpm_fed.federation import Prices
from tpm_fed.ledger.ledger import Ledger
from tpm_fed.ledger.pricing import Metered, price_usu
from tpm_fed.state.request_log import RequestLog

logger = logging.getLogger(__name__)

SWEEP_PERIOD_S = 60.0
"""How often a running service sweeps."""


@dataclass
class Swept:
    """What one sweep did, by request id."""

    settled: dict[str, int] = field(default_factory=dict)  # micro-SUs charged
    released: list[str] = field(default_factory=list)


class ReservationSweeper:
    """Settles reservations in doubt from the request log, or releases them.

    Args:
        ledger: The ledger whose reservations are swept.
        log: The request log in the same database.
        prices: The federation's prices now (a request is priced by its kind).
        in_flight: The request ids this process still waits on: never swept, whatever their deadline.
    """

    def __init__(self, ledger: Ledger, log: RequestLog, prices: Callable[[], Prices],
                 in_flight: Callable[[], Collection[str]] = frozenset) -> None:
        self.ledger = ledger
        self.log = log
        self.prices = prices
        self.in_flight = in_flight

    def sweep(self, now: float | None = None) -> Swept:
        """One pass over the reservations in doubt at ``now``."""
        waiting = set(self.in_flight())
        doubtful = [c for c in self.ledger.in_doubt(now) if c.request_id not in waiting]
        swept = Swept()
        if not doubtful:
            return swept
        logged = self.log.outcomes_of([c.request_id for c in doubtful])
        prices = self.prices()
        settle, release = [], []
        for charge in doubtful:
            row = logged.get(charge.request_id)
            if row is not None and row.status == "done":
                used = Metered(row.prompt_tokens or 0, row.completion_tokens or 0, row.activation_bytes or 0,
                               cold_start=bool(row.cold_start))
                settle.append((charge.request_id, used, price_usu(prices.of(charge.kind), used)))
            else:
                why = row.error if row is not None and row.status == "failed" else "no outcome was recorded"
                release.append((charge.request_id, f"released by the sweeper: {why}"))
        with self.ledger.engine.begin() as db:
            charged = self.ledger.settle_many(settle, db)
            released = self.ledger.release_many(release, db)
        swept.settled = {rid: amount for rid, amount in charged.items() if rid in {s[0] for s in settle}}
        swept.released = [rid for rid, done in released.items() if done]
        if swept.settled or swept.released:
            logger.info("sweeper: settled %d reservations in doubt, released %d",
                        len(swept.settled), len(swept.released))
        return swept
