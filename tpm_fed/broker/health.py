"""Site health: a site that fails is avoided, then probed back after a while.

A site can also be watched: its probe (for a Globus Compute site, the
endpoint's online status) is asked before a request is placed there, so an
offline endpoint is skipped and the request goes to the next best site. A
probe that raises (``NotLoggedIn``: no Globus credentials here) excludes
its site the same way, with the error as the reason in the placement's
explanation, rather than failing the placement everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

PROBE_AFTER_S = 30.0
"""How long a failed site is avoided before a request is allowed to probe it."""


class SiteHealth:
    def __init__(self, probe_after_s: float = PROBE_AFTER_S) -> None:
        self.probe_after_s = probe_after_s
        self._retry_at: dict[str, float] = {}
        self._probes: dict[str, Callable[[], str | None]] = {}
        self._lock = threading.Lock()

    def watch(self, site: str, probe: Callable[[], str | None]) -> None:
        """Ask ``probe`` before placing work at ``site``; it returns why not, or ``None``."""
        self._probes[site] = probe

    def problem(self, site: str) -> str | None:
        """Why ``site`` should not take work now, or ``None``."""
        retry_at = self._retry_at.get(site)  # a single dict read: no lock needed
        if retry_at is not None and time.monotonic() < retry_at:
            return "failed recently; probed again later"
        probe = self._probes.get(site)
        if probe is None:
            return None
        try:
            return probe()
        except Exception as error:  # e.g. NotLoggedIn: this site is out for this request, the others are not
            return f"{type(error).__name__}: {error}"

    def failed(self, site: str) -> None:
        with self._lock:
            self._retry_at[site] = time.monotonic() + self.probe_after_s

    def succeeded(self, site: str) -> None:
        with self._lock:
            self._retry_at.pop(site, None)
