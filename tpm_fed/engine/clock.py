"""The engine's one clock: what time it is, and one thread per dispatcher that runs what is due.

Every time in the dispatcher (arrivals, lingers, task starts and timeouts, a
request's time in the queue) is read from :func:`now`, so the replica queue's
decisions, which take ``now`` as an argument, are tested without a clock.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def now() -> float:
    """Seconds on the engine's clock (monotonic: only differences mean anything)."""
    return time.monotonic()


class Timed:
    """A callback due at ``when`` (on :func:`now`); :meth:`cancel` keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[Timed], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timed) -> bool:
        return self.when < other.when


class Clock:
    """One thread that runs a dispatcher's timed callbacks: lingers and task timeouts.

    A ``threading.Timer`` starts a thread: ~0.1 ms, twice per batch, on the
    path of every request. This thread is started on first use, waits on a
    condition for the earliest deadline, and exits after a minute with nothing to do.
    """

    IDLE_S = 60.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._due: list[Timed] = []
        self._condition = threading.Condition()
        self._running = False
        self._compact_at = 64

    def call_at(self, when: float, callback: Callable[[Timed], None]) -> Timed:
        """Run ``callback(timed)`` on the clock's thread at ``when`` (on :func:`now`)."""
        timed = Timed(when, callback)
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

    def _next(self) -> Timed | None:
        with self._condition:
            while True:
                while self._due and self._due[0].cancelled:
                    heapq.heappop(self._due)
                if not self._due:
                    if not self._condition.wait(self.IDLE_S) and not self._due:
                        self._running = False
                        return None
                    continue
                delay = self._due[0].when - now()
                if delay <= 0:
                    return heapq.heappop(self._due)
                self._condition.wait(delay)
