"""A running task's open takes for more requests, held on the event loop instead of on a thread.

While a vLLM task runs, the service's end of its channel keeps one take open
for it (:meth:`tpm_fed.engine.joining.Joining.take`). Held on a thread, 64
running tasks would park 64 threads of the pool the routes also submit
through; here a held take is an :class:`asyncio.Event` on the loop that
serves the channel, set from whichever thread queues a request
(``loop.call_soon_threadsafe``). Only reserving what a take took touches the
database, on a small executor of its own (:data:`RESERVING`), so that work
never waits behind submissions nor they behind it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

RESERVING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tpm-reserve-joining")
"""Reserves the requests a take took (a ledger transaction); threads start on first use."""


class OpenAsks:
    """Takes waiting for a request to arrive. Every method is called under its owner's lock."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}

    def hold(self) -> asyncio.Event:
        """On the event loop: an event set at the next :meth:`wake`."""
        woken = asyncio.Event()
        self._waiting[woken] = asyncio.get_running_loop()
        return woken

    def drop(self, woken: asyncio.Event) -> None:
        """The take ended (it took some, timed out or was cancelled)."""
        self._waiting.pop(woken, None)

    def wake(self) -> None:
        """From any thread: every held take looks again (a request arrived, room freed, or its task ended)."""
        for woken, loop in self._waiting.items():
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # that loop is closed: its take went with it
                pass
        self._waiting.clear()

    def __len__(self) -> int:
        return len(self._waiting)
