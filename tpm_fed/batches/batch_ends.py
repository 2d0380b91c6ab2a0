"""Who waits for a batch to end, and waking them when it does: the long poll behind
``GET /v1/batches/{id}?wait=S``.

A caller waiting for its batch otherwise polls, and learns of the end half a
poll late on average (0.05 s a batch at the benchmark's 0.1 s poll, on a
batch of about half a second). Here a route's coroutine waits on a future of
its own event loop; the batch runner, on its own thread, wakes every waiter of
the batches its settling pass ended, in their loops. The wait is bounded by
the caller's ``wait`` (itself capped by :data:`MAX_WAIT_S`), so a wake-up missed
for any reason (another process settled the batch) costs at most that.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

MAX_WAIT_S = 10.0
"""The longest one ``GET /v1/batches/{id}?wait=S`` is held (a larger ``wait`` is cut to this): short enough
that a stopping service, which lets requests in flight finish, is not held up by a long poll for long."""

ENDED = ("completed", "failed", "expired", "cancelled")
"""A batch in one of these states changes no more."""


class BatchEnds:
    """Waiters for batches' ends, woken from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def watch(self, batch_id: str) -> asyncio.Future[None]:
        """A future of the running loop that resolves when ``batch_id`` ends; :meth:`unwatch` it after."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.setdefault(batch_id, []).append(future)
        return future

    def unwatch(self, batch_id: str, future: asyncio.Future[None]) -> None:
        with self._lock:
            waiters = self._waiting.get(batch_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiting.pop(batch_id, None)

    def ended(self, batch_ids: Iterable[str]) -> None:
        """These batches ended (or may have: a cancel, an expiry): wake their waiters."""
        with self._lock:
            woken = [future for batch_id in batch_ids for future in self._waiting.pop(batch_id, [])]
        for future in woken:
            future.get_loop().call_soon_threadsafe(_done, future)

    async def wait(self, future: asyncio.Future[None], timeout_s: float) -> bool:
        """Wait for a watched end, at most ``timeout_s``; whether it came."""
        done, _ = await asyncio.wait({future}, timeout=timeout_s)
        return bool(done)


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
