"""A lock that knows its holder, so "called under the lock" is checked, not only written down.

Every dispatcher method whose name ends in ``_locked`` must be called with the
dispatcher's lock held by the calling thread; it begins with
``self._lock.assert_held()``, and ``tests/test_engine_parts.py`` checks that each
such method does.
"""

from __future__ import annotations

import threading


class OwnedLock:
    """A non-reentrant lock that records which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> OwnedLock:
        self._lock.acquire()
        self._holder = threading.get_ident()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._holder = None
        self._lock.release()

    def assert_held(self) -> None:
        """Raise unless the calling thread holds the lock (a caller that forgot to take it)."""
        if self._holder != threading.get_ident():
            raise AssertionError("called without the dispatcher's lock held")
