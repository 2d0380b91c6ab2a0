"""The service's end of the back channel: streamed text from workers to the callers waiting for it.

A caller's streamed request is *listened for* before it is admitted. When
its batch leaves for a site, the dispatcher asks :meth:`StreamHub.open` for
the task's back channel: a URL and a secret made for that one task, naming
the listened-for requests it carries. The worker POSTs chunks to
``/tpm/v1/stream`` with that secret (see :mod:`functions.streaming`);
:meth:`StreamHub.deliver` accepts a post only if the secret is a task's that
is still running and every chunk names a request of that task, so a forged
or replayed secret injects nothing into anyone's stream. The secret dies
with its task.

A caller that goes away mid-stream *abandons* its request: the answer to
the worker's next post names it under ``cancelled``, and the worker stops
generating for it (its batch-mates go on); it is charged for what ran.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from tpm_fed.protocol.errors import NotPermitted, Unauthenticated

STREAM_ROUTE = "/tpm/v1/stream"


@dataclass
class Listener:
    """Where a streamed request's chunks wait for its event stream (read on the event loop)."""

    loop: asyncio.AbstractEventLoop
    base_url: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: int = 0

    def put(self, chunk: dict[str, Any]) -> None:
        """From any thread."""
        self.received += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)


class StreamHub:
    """Listeners by request id, and the secrets of running tasks that may feed them."""

    def __init__(self) -> None:
        self._listeners: dict[str, Listener] = {}
        self._tasks: dict[str, frozenset[str]] = {}
        self._abandoned: set[str] = set()
        self._lock = threading.Lock()

    def listen(self, request_id: str, base_url: str) -> Listener:
        """Called on the event loop before the request is admitted; ``base_url`` is how workers reach us."""
        listener = Listener(asyncio.get_running_loop(), base_url.rstrip("/"))
        with self._lock:
            self._listeners[request_id] = listener
        return listener

    def forget(self, request_id: str, *, abandoned: bool = False) -> None:
        """Stop listening; ``abandoned``: the caller left before the end (its generation may stop)."""
        with self._lock:
            self._listeners.pop(request_id, None)
            if abandoned and any(request_id in ids for ids in self._tasks.values()):
                self._abandoned.add(request_id)

    def open(self, request_ids: list[str]) -> dict[str, str] | None:
        """A batch leaves: its back channel, if any of its requests is listened for (None otherwise)."""
        with self._lock:
            listened = frozenset(rid for rid in request_ids if rid in self._listeners)
            if not listened:
                return None
            base_url = self._listeners[next(iter(listened))].base_url
            token = secrets.token_urlsafe(32)
            self._tasks[token] = listened
        return {"url": base_url + STREAM_ROUTE, "token": token}

    def close(self, token: str) -> None:
        """The task ended: its secret is no longer accepted."""
        with self._lock:
            self._abandoned -= self._tasks.pop(token, frozenset())

    def deliver(self, token: str, chunks: list[dict[str, Any]]) -> tuple[int, list[str]]:
        """Hand a worker's chunks to their listeners.

        Returns:
            The number delivered, and the task's requests whose callers left (to stop generating).

        Raises:
            Unauthenticated: No running task has this secret (forged, or its task ended).
            NotPermitted: A chunk names a request that is not that task's (nothing is delivered).
        """
        with self._lock:
            allowed = self._tasks.get(token)  # 256 random bits: a lookup reveals nothing usable
            if allowed is None:
                raise Unauthenticated("not a running task's stream token")
            if any(chunk.get("request_id") not in allowed for chunk in chunks):
                raise NotPermitted("a chunk names a request that is not this task's")
            listeners = [(self._listeners.get(chunk["request_id"]), chunk) for chunk in chunks]
            cancelled = sorted(allowed & self._abandoned)
        delivered = 0
        for listener, chunk in listeners:
            if listener is not None:  # its caller may have gone
                listener.put(chunk)
                delivered += 1
        return delivered, cancelled
