"""The service's end of the back channel: streamed text from workers to the callers waiting for it.

A caller's streamed request gets a chunk queue before it is started. When
its task leaves for a site, the dispatcher asks :meth:`BackChannelHub.open` for
the task's back channel: the service's own worker URL (set once, when it is
bound; never taken from a request, whose ``Host`` the caller writes) and a
secret made for that one task, naming the requests it carries. The worker POSTs chunks to
``/tpm/v1/stream`` with that secret (see :mod:`functions.back_channel`);
:meth:`BackChannelHub.deliver` accepts a post only if the secret is a task's that
is still running and every chunk names a request of that task, so a forged
or replayed secret injects nothing into anyone's stream. The secret dies
with its task.

A caller that goes away mid-stream *abandons* its request: the answer to
the worker's next post names it under ``cancelled``, and the worker stops
generating for it (its task-mates go on); it is charged for what ran.

The same channel carries joining (:mod:`functions.joining`):
a task whose dispatcher lets requests join it (its :class:`Admitting` hooks)
gets a channel even when nothing in it streams. The worker asks
:meth:`BackChannelHub.admit` for requests queued for its replica, and posts each
request's outcome when it finishes (:meth:`BackChannelHub.deliver`'s
``outcomes``), which the dispatcher settles at once. A secret hands over and
answers only requests of its own task, and those it was handed.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from tpm_fed.protocol.back_channel import ChannelAddress
from tpm_fed.protocol.errors import NotPermitted, Unauthenticated

STREAM_ROUTE = "/tpm/v1/stream"


@dataclass
class ChunkQueue:
    """Where a streamed request's chunks wait for its caller's event stream (read on the event loop)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: int = 0

    def put(self, chunk: dict[str, Any]) -> None:
        """From any thread."""
        self.received += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)


class Admitting(Protocol):
    """A running task's dispatcher, for the requests that join the task and their answers."""

    async def admit(self, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """Requests (wire dicts) that join the task now, reserved; and whether more may join later.
        Waits up to ``wait_s`` for one to arrive, on the event loop (holding no thread)."""
        ...

    def stop_admitting(self) -> None:
        """The worker takes no more (its engine ran dry); a waiting :meth:`admit` returns now."""
        ...

    def answered(self, served: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
        """Outcomes of the task's requests that finished before it did, by request id."""
        ...


@dataclass
class _Task:
    requests: set[str]  # this task's requests: what its secret may feed and answer
    admitting: Admitting | None = None


class BackChannelHub:
    """Chunk queues by request id, and the secrets of running tasks that may feed them.

    Args:
        worker_url: How workers reach this service: the bound address or ``TPM_SERVICE_WORKER_URL``
            (:func:`tpm_fed.service.app.serve_at`). None until the service is bound: no channel.
    """

    def __init__(self, worker_url: str | None = None) -> None:
        self.worker_url = worker_url
        self._queues: dict[str, ChunkQueue] = {}
        self._tasks: dict[str, _Task] = {}
        self._abandoned: set[str] = set()
        self._lock = threading.Lock()

    def queue_for(self, request_id: str) -> ChunkQueue:
        """Called on the event loop before the request is started."""
        queue = ChunkQueue(asyncio.get_running_loop())
        with self._lock:
            self._queues[request_id] = queue
        return queue

    def forget(self, request_id: str, *, abandoned: bool = False) -> None:
        """Drop its chunk queue; ``abandoned``: the caller left before the end (its generation may stop)."""
        with self._lock:
            self._queues.pop(request_id, None)
            if abandoned and any(request_id in task.requests for task in self._tasks.values()):
                self._abandoned.add(request_id)

    def open(self, request_ids: list[str], admitting: Admitting | None = None) -> dict[str, str] | None:
        """A task leaves: its back channel (None: nothing in it streams and nothing may join it, or
        no worker could reach us)."""
        with self._lock:
            queued = [rid for rid in request_ids if rid in self._queues]
            if self.worker_url is None or (not queued and admitting is None):
                return None
            token = secrets.token_urlsafe(32)
            self._tasks[token] = _Task(set(request_ids), admitting)
        return ChannelAddress(url=self.worker_url.rstrip("/") + STREAM_ROUTE, token=token).to_wire()

    def close(self, token: str) -> None:
        """The task ended: its secret is no longer accepted."""
        with self._lock:
            task = self._tasks.pop(token, None)
            if task is not None:
                self._abandoned -= task.requests

    def deliver(self, token: str, chunks: list[dict[str, Any]], outcomes: dict[str, dict[str, Any]] | None = None,
                served: dict[str, Any] | None = None) -> tuple[int, list[str]]:
        """Hand a worker's chunks to their queues, then its early answers to the task's dispatcher.

        Returns:
            The number of chunks delivered, and the task's requests whose callers left (to stop
            generating).

        Raises:
            Unauthenticated: No running task has this secret (forged, or its task ended).
            NotPermitted: A chunk or an answer names a request that is not that task's (nothing is
                delivered).
        """
        with self._lock:
            task = self._task(token)
            named = [chunk.get("request_id") for chunk in chunks] + list(outcomes or ())
            if any(rid not in task.requests for rid in named):
                raise NotPermitted("a chunk or an answer names a request that is not this task's")
            queues = [(self._queues.get(chunk["request_id"]), chunk) for chunk in chunks]
            cancelled = sorted(task.requests & self._abandoned)
        delivered = 0
        for queue, chunk in queues:
            if queue is not None:  # its caller may have gone
                queue.put(chunk)
                delivered += 1
        if outcomes and task.admitting is not None:
            task.admitting.answered(served or {}, outcomes)
        return delivered, cancelled

    async def admit(self, token: str, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        """Requests that join the task with this secret (waits up to ``wait_s`` for one), and whether
        the worker may ask again. A task whose dispatcher takes none in answers ``[], False``.

        Raises:
            Unauthenticated: No running task has this secret.
        """
        with self._lock:
            task = self._task(token)
        if task.admitting is None:
            return [], False
        joined, more = await task.admitting.admit(wait_s)
        with self._lock:
            task.requests.update(wire["request_id"] for wire in joined)  # its secret may answer these now
        return joined, more

    def stop_admitting(self, token: str) -> None:
        """The worker with this secret takes no more requests."""
        with self._lock:
            task = self._task(token)
        if task.admitting is not None:
            task.admitting.stop_admitting()

    def _task(self, token: str) -> _Task:
        """Called under the lock."""
        task = self._tasks.get(token)  # 256 random bits: a lookup reveals nothing usable
        if task is None:
            raise Unauthenticated("not a running task's stream token")
        return task
