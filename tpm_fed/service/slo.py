"""Service level objectives: p50/p95 latency and availability per request kind, over a sliding window.

The operator writes targets in the federation file (``slos:``); the service
records every request it ends (:meth:`SloTracker.record`) and reports, per
kind, what it measured against what was promised (``GET /tpm/v1/slo``,
``tpm slo``, the web page, ``/metrics``).

- **Latency** is end to end as the service saw it, over successful requests.
- **Availability** is the share of requests the federation did not fail:
  refusals that are the caller's to fix (bad input, no balance, not a
  member) count neither way; a site failure, a lost worker or "no site can
  serve now" counts against it.

The window is kept in memory, in bounded space whatever the request rate or
the window's length: it is cut into :data:`SLICES` slices, each holding the
counts of its outcomes and a sketch of its latencies (DDSketch: percentiles
within :data:`ACCURACY` of the exact value, mergeable, a fixed number of
bins). A slice leaves when all of it is older than the window, so a report
covers the window and at most one slice (1/60 of it) more. A restarted
service starts a new window.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ddsketch import LogCollapsingLowestDenseDDSketch

from tpm_fed.protocol.kinds import KINDS


SLICES = 60  # the window is kept as this many slices
ACCURACY = 0.01  # a reported percentile is within 1% of the exact one
BINS = 2048  # a sketch's most bins: 1% buckets span about 18 decades (past that, the fastest bins merge)


def sketch() -> LogCollapsingLowestDenseDDSketch:
    """An empty latency sketch: a fixed number of bins, whatever it is given."""
    return LogCollapsingLowestDenseDDSketch(relative_accuracy=ACCURACY, bin_limit=BINS)


def percentile(latencies: LogCollapsingLowestDenseDDSketch, share: float) -> float:
    """The nearest-rank percentile (``share`` in (0, 1]) of a non-empty sketch, within :data:`ACCURACY`."""
    count = int(latencies.count)
    rank = max(0, math.ceil(share * count) - 1)  # 0-based, as the exact nearest rank of sorted values
    # DDSketch reads rank quantile * (count - 1); half a rank more keeps float rounding off the rank below.
    return latencies.get_quantile_value(min(1.0, (rank + 0.5) / (count - 1)) if count > 1 else 0.0)


@dataclass
class Slice:
    """The requests of one kind that ended in [start, end): how many of each outcome, and the served ones' latencies."""

    start: float
    width: float  # the window's length / SLICES when it was cut (kept as given: compared with that again)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: LogCollapsingLowestDenseDDSketch = field(default_factory=sketch)

    @property
    def end(self) -> float:
        return self.start + self.width


class SloTracker:
    """Recent requests per kind, and the report against the federation's targets.

    Args:
        slos: Returns the federation's ``slos`` (:class:`tpm_fed.federation.Slos`), window and
            targets; asked each time, so an operator's change applies without a restart.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, slos: Callable[[], Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.slos = slos
        self._clock = clock
        self._seen: dict[str, deque[Slice]] = {kind: deque() for kind in KINDS}
        self._lock = threading.Lock()

    def record(self, kind: str, seconds: float, outcome: str) -> None:
        """One request of ``kind`` ended after ``seconds``: ``ok``, ``refused`` or ``failed``."""
        if kind not in self._seen:
            return
        now, window_s = self._clock(), self.slos().window_s
        with self._lock:
            slices = self._seen[kind]
            # A slice cut for a longer window (the operator shortened it) takes nothing more.
            if not slices or now >= slices[-1].end or slices[-1].width > window_s / SLICES:
                slices.append(Slice(now, window_s / SLICES))
            slices[-1].outcomes[outcome] += 1
            if outcome == "ok":
                slices[-1].latencies.add(seconds)
            self._forget_outside(now, window_s)

    def report(self) -> dict[str, Any]:
        """Per kind: requests, p50/p95 seconds, availability, the target and whether it is met."""
        now, slos = self._clock(), self.slos()
        with self._lock:
            self._forget_outside(now, slos.window_s)
            merged = {kind: self._merged(slices) for kind, slices in self._seen.items()}
        return {"window_s": slos.window_s,
                "kinds": [self._row(kind, *merged[kind], getattr(slos, kind)) for kind in merged]}

    @staticmethod
    def _merged(slices: deque[Slice]) -> tuple[Counter[str], LogCollapsingLowestDenseDDSketch]:
        outcomes, latencies = Counter(), sketch()
        for one in slices:
            outcomes.update(one.outcomes)
            latencies.merge(one.latencies)
        return outcomes, latencies

    def _row(self, kind: str, outcomes: Counter[str], latencies: LogCollapsingLowestDenseDDSketch,
             target: Any) -> dict[str, Any]:
        requests = sum(outcomes.values())
        counted = requests - outcomes["refused"]
        row: dict[str, Any] = {
            "kind": kind,
            "requests": requests,
            "refused": outcomes["refused"],
            "failed": outcomes["failed"],
            "p50_s": percentile(latencies, 0.5) if latencies.count else None,
            "p95_s": percentile(latencies, 0.95) if latencies.count else None,
            "availability": outcomes["ok"] / counted if counted else None,
            "target": target.model_dump() if target else None,
            "met": None,
        }
        if target and counted:
            row["met"] = {
                "latency": row["p95_s"] is not None and row["p95_s"] <= target.p95_latency_s,
                "availability": row["availability"] >= target.availability,
            }
        return row

    def _forget_outside(self, now: float, window_s: float) -> None:
        """Drop the slices wholly older than the window, and those cut for a longer window once they begin
        before it (so a shortened window is not read over the old slices' length)."""
        cutoff, width = now - window_s, window_s / SLICES
        for slices in self._seen.values():
            while slices and (slices[0].end <= cutoff or (slices[0].start < cutoff and slices[0].width > width)):
                slices.popleft()
