"""The service's end of the back channel: running tasks' channels, and the callers waiting for their text.

A caller's streamed request gets a chunk queue before it is started. When
its task leaves for a site, the dispatcher asks :meth:`BackChannelHub.open` for
the task's channel: the service's own worker URL (set once, when it is
bound; never taken from a request, whose ``Host`` the caller writes) and a
secret made for that one task, naming the requests it carries. The worker
opens one WebSocket there and says the secret first
(:mod:`tpm_fed.service.routes_channel`); :meth:`BackChannelHub.connect`
accepts it only for a task that is still running and has no channel yet, so
a forged, replayed or second use of a secret gets nothing and feeds nothing.
:meth:`BackChannelHub.deliver` takes a frame's chunks only if every one names
a request of that task. The secret dies with its task.

A caller that goes away mid-stream *abandons* its request: the service pushes
its id to the task's channel (:class:`~tpm_fed.protocol.back_channel.Cancelled`)
and the worker stops generating for it (its task-mates go on); it is charged
for what ran.

The same channel carries joining: a task whose dispatcher lets requests
join it (its :class:`Joins` hooks) gets a channel even when nothing in it
streams. The service pushes the requests queued for its replica as they
come (reserved first), and the worker answers each when it finishes
(:meth:`BackChannelHub.deliver`'s ``outcomes``), which the dispatcher settles at
once. A secret answers only requests of its own task, and those it was handed.

A channel outlives its socket: what the service pushes is numbered and kept
in the task's :class:`~tpm_fed.service.channel_session.Session` until the worker acknowledges it, and the
worker's frames are taken once each, by number. A dropped socket
(:meth:`BackChannelHub.disconnect` with ``clean`` false) changes nothing
else: joining goes on, and what is pushed meanwhile waits for the worker's
next socket, which :meth:`BackChannelHub.connect` accepts only with the
task's secret *and* the resume key the service gave the first socket (so a
replayed secret still opens nothing), replacing the dead one.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from tpm_fed.protocol.back_channel import (
    CHANNEL_ROUTE,
    Cancelled,
    ChannelAddress,
    Hello,
    Settled,
)
from tpm_fed.protocol.errors import NotPermitted, Unauthenticated
from tpm_fed.service.channel_session import Joins, Link, Session, running_loop


@dataclass
class ChunkQueue:
    """Where a streamed request's chunks wait for its caller's event stream (read on the event loop)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: int = 0

    def put(self, chunk: dict[str, Any]) -> None:
        """From any thread; on its own loop (the channel's frames arrive there), straight in."""
        self.received += 1
        if running_loop() is self.loop:
            self.queue.put_nowait(chunk)
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)


SETTLED_EVERY = 64
"""Early answers settled before the worker hears which (one :class:`Settled` frame per this many): it keeps
an answer for its task's result until then, so what it keeps stays bounded however many the task serves."""

class BackChannelHub:
    """Chunk queues by request id, and the secrets and channels of running tasks that may feed them.

    Args:
        worker_url: How workers reach this service: the bound address or ``TPM_SERVICE_WORKER_URL``
            (:func:`tpm_fed.service.app.serve_at`). None until the service is bound: no channel.
    """

    def __init__(self, worker_url: str | None = None) -> None:
        self.worker_url = worker_url
        self._queues: dict[str, ChunkQueue] = {}
        self._tasks: dict[str, Session] = {}
        self._abandoned: set[str] = set()
        self._lock = threading.Lock()

    def queue_for(self, request_id: str) -> ChunkQueue:
        """Called on the event loop before the request is started."""
        queue = ChunkQueue(asyncio.get_running_loop())
        with self._lock:
            self._queues[request_id] = queue
        return queue

    def forget(self, request_id: str, *, abandoned: bool = False) -> None:
        """Drop its chunk queue; ``abandoned``: the caller left before the end (its generation stops)."""
        with self._lock:
            self._queues.pop(request_id, None)
            if not abandoned:
                return
            carriers = [task for task in self._tasks.values() if request_id in task.requests]
            if carriers:
                self._abandoned.add(request_id)  # a channel not open yet hears it when it opens
        for task in carriers:
            task.push(Cancelled(request_ids=[request_id]))

    def open(self, request_ids: list[str], joins: Joins | None = None) -> dict[str, str] | None:
        """A task leaves: its channel's address (None: nothing in it streams and nothing may join it, or
        no worker could reach us)."""
        with self._lock:
            queued = [rid for rid in request_ids if rid in self._queues]
            if self.worker_url is None or (not queued and joins is None):
                return None
            token = secrets.token_urlsafe(32)
            self._tasks[token] = Session(set(request_ids), joins, own=frozenset(request_ids))
        return ChannelAddress(url=self.worker_url.rstrip("/") + CHANNEL_ROUTE, token=token).to_wire()

    def close(self, token: str) -> None:
        """The task ended: its secret is no longer accepted, and its channel closes."""
        with self._lock:
            task = self._tasks.pop(token, None)
            if task is None:
                return
            self._abandoned -= task.requests
        task.end()

    def connect(self, hello: Hello) -> Link:
        """On the event loop: the worker of the task with this secret opened a socket for its channel, the
        first (no resume key) or a later one (the key its first socket was given), which replaces the last.

        Raises:
            Unauthenticated: No running task has this secret (forged, or its task ended).
            NotPermitted: This task's channel was opened already and this socket does not say its resume key
                (a replayed secret).
        """
        with self._lock:
            task = self._task(hello.token)
            if hello.resume is None:
                if task.resume is not None:
                    raise NotPermitted("this task's channel was opened already")
                task.resume = secrets.token_urlsafe(32)
                cancelled = sorted(task.requests & self._abandoned)
            elif task.resume is None or not secrets.compare_digest(hello.resume.encode(), task.resume.encode()):
                raise NotPermitted("not this task's resume key")
            else:
                cancelled = []  # pushed to the session already: what the worker lacks is sent again
        link = task.attach(hello.token, hello.received)
        if cancelled:
            task.push(Cancelled(request_ids=cancelled))
        return link

    def disconnect(self, link: Link, clean: bool) -> None:
        """Its socket closed. ``clean``: the worker closed it (its task is ending): nothing more joins. Else it
        dropped: the channel waits for the worker's next socket, joining goes on, pushes are kept."""
        if link.session.detach(link) and clean and link.joins is not None:
            link.joins.stop_joining()

    def joined(self, token: str, request_ids: list[str]) -> None:
        """Requests that joined the task with this secret: it may stream and answer them now."""
        with self._lock:
            task = self._tasks.get(token)
            if task is not None:
                task.requests.update(request_ids)

    def check(self, token: str, request_ids: list[str]) -> Joins | None:
        """The joining hooks of the running task with this secret, if every id names one of its requests.

        Raises:
            Unauthenticated: No running task has this secret.
            NotPermitted: An id is not that task's.
        """
        with self._lock:
            task = self._task(token)
            if any(rid not in task.requests for rid in request_ids):
                raise NotPermitted("a chunk or an answer names a request that is not this task's")
        return task.joins

    def deliver(self, token: str, chunks: list[dict[str, Any]], outcomes: dict[str, dict[str, Any]] | None = None,
                served: dict[str, Any] | None = None) -> int:
        """Hand a worker's chunks to their queues, then its early answers to the task's dispatcher (which
        settles them: a ledger transaction, so off the event loop when there are any).

        Returns:
            The number of chunks delivered (a caller may have left).

        Raises:
            Unauthenticated: No running task has this secret (forged, or its task ended).
            NotPermitted: A chunk or an answer names a request that is not that task's (nothing is
                delivered).
        """
        joins = self.check(token, [chunk.get("request_id") for chunk in chunks] + list(outcomes or ()))
        with self._lock:
            queues = [(self._queues.get(chunk["request_id"]), chunk) for chunk in chunks]
        delivered = 0
        for queue, chunk in queues:
            if queue is not None:  # its caller may have gone
                queue.put(chunk)
                delivered += 1
        if outcomes and joins is not None:
            joins.answered(served or {}, outcomes)
            self._settled(token, list(outcomes))
        return delivered

    def _settled(self, token: str, request_ids: list[str]) -> None:
        """These early answers are settled (now, or before: a repeat): tell the worker, in batches, those of
        requests that joined the task (what a long-lived task's worker would otherwise keep), and forget them
        here too (a joined request's answer is its last frame: the worker sends its chunks before it)."""
        with self._lock:
            task = self._tasks.get(token)
            if task is None:
                return
            joined = [rid for rid in request_ids if rid not in task.own]
            task.requests.difference_update(joined)  # else a long-lived task's set grows with all it served
            task.settled += joined
            if len(task.settled) < SETTLED_EVERY:
                return
            told, task.settled = task.settled, []
        task.push(Settled(request_ids=told))

    def _task(self, token: str) -> Session:
        """Called under the lock."""
        task = self._tasks.get(token)  # 256 random bits: a lookup reveals nothing usable
        if task is None:
            raise Unauthenticated("not a running task's channel secret")
        return task
