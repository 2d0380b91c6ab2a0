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

The window is kept in memory: a restarted service starts a new window.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tpm_fed.protocol.kinds import KINDS


def percentile(sorted_values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in (0, 1]) of already sorted values."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


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
        self._seen: dict[str, deque[tuple[float, float, str]]] = {kind: deque() for kind in KINDS}
        self._lock = threading.Lock()

    def record(self, kind: str, seconds: float, outcome: str) -> None:
        """One request of ``kind`` ended after ``seconds``: ``ok``, ``refused`` or ``failed``."""
        if kind not in self._seen:
            return
        now = self._clock()
        with self._lock:
            self._seen[kind].append((now, seconds, outcome))
            self._forget_before(now - self.slos().window_s)

    def report(self) -> dict[str, Any]:
        """Per kind: requests, p50/p95 seconds, availability, the target and whether it is met."""
        now, slos = self._clock(), self.slos()
        with self._lock:
            self._forget_before(now - slos.window_s)
            seen = {kind: list(rows) for kind, rows in self._seen.items()}
        return {"window_s": slos.window_s,
                "kinds": [self._row(kind, rows, getattr(slos, kind)) for kind, rows in seen.items()]}

    def _row(self, kind: str, rows: list[tuple[float, float, str]], target: Any) -> dict[str, Any]:
        latencies = sorted(seconds for _, seconds, outcome in rows if outcome == "ok")
        counted = [outcome for _, _, outcome in rows if outcome != "refused"]
        row: dict[str, Any] = {
            "kind": kind,
            "requests": len(rows),
            "refused": len(rows) - len(counted),
            "failed": counted.count("failed"),
            "p50_s": percentile(latencies, 0.5) if latencies else None,
            "p95_s": percentile(latencies, 0.95) if latencies else None,
            "availability": counted.count("ok") / len(counted) if counted else None,
            "target": target.model_dump() if target else None,
            "met": None,
        }
        if target and counted:
            row["met"] = {
                "latency": row["p95_s"] is not None and row["p95_s"] <= target.p95_latency_s,
                "availability": row["availability"] >= target.availability,
            }
        return row

    def _forget_before(self, cutoff: float) -> None:
        for rows in self._seen.values():
            while rows and rows[0][0] < cutoff:
                rows.popleft()
