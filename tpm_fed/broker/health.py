"""Site health: a site that fails is avoided, then probed back after a while."""

from __future__ import annotations

import threading
import time

PROBE_AFTER_S = 30.0
"""How long a failed site is avoided before a request is allowed to probe it."""


class SiteHealth:
    def __init__(self, probe_after_s: float = PROBE_AFTER_S) -> None:
        self.probe_after_s = probe_after_s
        self._retry_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def healthy(self, site: str) -> bool:
        """True unless the site failed less than ``probe_after_s`` ago."""
        retry_at = self._retry_at.get(site)  # a single dict read: no lock needed
        return retry_at is None or time.monotonic() >= retry_at

    def failed(self, site: str) -> None:
        with self._lock:
            self._retry_at[site] = time.monotonic() + self.probe_after_s

    def succeeded(self, site: str) -> None:
        with self._lock:
            self._retry_at.pop(site, None)
