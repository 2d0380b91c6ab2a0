"""Requests joining a task while it runs: the worker's end of joining (continuous batching).

The endpoint engine runs one task at a time per worker. Without more, a
request that arrives while a replica generates waits for the whole task to
end (vLLM's own server would take it in at the next step). So while a vLLM
task runs, the worker asks the service, on the task's
back channel, for requests queued for this replica: a long poll (``POST
.../tpm/v1/stream/admit`` with the task's secret), answered as soon as one
arrives or after :data:`JOIN_WAIT_S`. What it is handed joins the running
engine at its next step, and each joined request is answered on the back
channel when it finishes (:meth:`functions.back_channel.BackChannel.answer`).

- The service decides what may join: requests of this task's replica, as
  many as the task has room for, for a bounded time; it reserves their
  service units before handing them over, as for any task.
- When its engine runs dry, the worker stops taking joiners (``close``) and
  serves what arrived meanwhile before the task returns; the task's result
  lists every joined request's outcome (``joined``), so a lost answer on the
  back channel loses nothing, and a request handed over that the worker
  never read goes back to the replica's queue.
- Any failure ends joining for the task; what already joined still runs.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from functions.backends.base import EncodedRequest
from functions.outcomes import generated, refused
from functions.back_channel import BackChannel
from tpm_fed.protocol.back_channel import JoinAnswer, JoinAsk
from tpm_fed.protocol.errors import InvalidRequest, TpmError
from tpm_fed.protocol.kinds import KINDS, request_from_wire
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion

JOIN_WAIT_S = 1.0
"""Longest the service holds one ask open when nothing waits (it answers at once when something does)."""

CLOSE_TIMEOUT_S = 2.0
"""Longest a task's end waits to tell the service it takes no more (the open ask then ends by itself)."""


class JoinPoller:
    """Asks the service for joining requests from a background thread, started on the first :meth:`take`."""

    def __init__(self, url: str, token: str) -> None:
        self.url = urlsplit(url)
        self.token = token
        self.failed: str | None = None
        self._arrived: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> list[dict[str, Any]]:
        """The request dicts handed in since the last call (returns at once)."""
        if self._thread is None and not self._closed.is_set():
            self._thread = threading.Thread(target=self._run, name="tpm-join", daemon=True)
            self._thread.start()
        with self._lock:
            arrived, self._arrived = self._arrived, []
        return arrived

    def close(self) -> list[dict[str, Any]]:
        """Ask for no more; the requests handed in before the service heard it (to be served too)."""
        self._closed.set()
        if self._thread is None:
            return []
        heard = False
        if self.failed is None:
            try:  # the service answers the open ask at once, so the thread ends without waiting it out
                self._ask(self._connect(CLOSE_TIMEOUT_S), JoinAsk(token=self.token, close=True))
                heard = True
            except (OSError, http.client.HTTPException, ValueError):
                pass  # unreachable: an ask it may still answer hands over requests the service takes back
        self._thread.join(JOIN_WAIT_S + CLOSE_TIMEOUT_S if heard else 0.0)
        with self._lock:
            arrived, self._arrived = self._arrived, []
        return arrived

    def _run(self) -> None:
        connection = None
        while not self._closed.is_set():
            try:
                connection = connection or self._connect()
                reply = self._ask(connection, JoinAsk(token=self.token, wait_s=JOIN_WAIT_S))
            except (OSError, http.client.HTTPException, ValueError) as error:
                self.failed = f"{type(error).__name__}: {error}"
                break
            if reply.requests:
                with self._lock:
                    self._arrived.extend(reply.requests)
            if not reply.open:  # the service takes no more into this task
                break
        if connection is not None:
            connection.close()

    def _connect(self, timeout_s: float = JOIN_WAIT_S + 10) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        return kind(self.url.hostname, self.url.port, timeout=timeout_s)

    def _ask(self, connection: http.client.HTTPConnection, message: JoinAsk) -> JoinAnswer:
        connection.request("POST", self.url.path, body=json.dumps(message.to_wire()).encode(),
                           headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise ValueError(f"the service answered {answer.status}")
        return JoinAnswer.model_validate_json(body)  # not one: a ValidationError, which is a ValueError


class JoinableTask:
    """A generate task that stays open to joining requests while it runs, handed to the backend in place of
    its back channel.

    A backend that can (vLLM) takes joining requests at each step
    (:meth:`joined`), answers each request when it finishes
    (:meth:`finished`), and stops taking joiners when it runs dry (:meth:`close`).
    One that cannot (torch) only streams through :meth:`send` and reads
    :attr:`cancelled`, as with a bare channel.

    Args:
        channel: The task's back channel.
        encode: The backend's tokenizer step (refuses a prompt that does not fit).
    """

    def __init__(self, channel: BackChannel, encode: Callable[[GenerationRequest], EncodedRequest]) -> None:
        self.channel = channel
        self.encode = encode
        self.poller = JoinPoller(channel.join_url, channel.token)
        self._started: dict[str, float] = {}

    @property
    def cancelled(self) -> set[str]:
        return self.channel.cancelled

    def send(self, chunks: list[dict[str, Any]]) -> None:
        self.channel.send(chunks)

    def started(self, item: EncodedRequest) -> None:
        """``item`` entered the engine now (its ``run_s`` counts from here)."""
        self._started[item.request.request_id] = time.perf_counter()

    def joined(self) -> list[EncodedRequest]:
        """Requests that joined since the last call, tokenized (one that cannot run is answered, refused)."""
        return self._encoded(self.poller.take())

    def close(self) -> list[EncodedRequest]:
        """No more may join; those that joined meanwhile (they run before the task ends)."""
        return self._encoded(self.poller.close())

    def finished(self, item: EncodedRequest, completions: list[Completion]) -> None:
        """``item`` is done: answer its caller now, not at the end of the batch."""
        self._answer(item.request.request_id, generated(item, completions))

    def _answer(self, request_id: str, outcome: dict[str, Any]) -> None:
        started = self._started.pop(request_id, None)
        self.channel.answer(request_id, outcome, 0.0 if started is None else time.perf_counter() - started)

    def _encoded(self, wires: list[dict[str, Any]]) -> list[EncodedRequest]:
        encoded = []
        for wire in wires:
            request_id = wire.get("request_id") if isinstance(wire, dict) else None
            try:
                request = request_from_wire(wire)
                if not KINDS[request.kind].joins_on:  # the service hands over only kinds that join
                    raise InvalidRequest(f"a {request.kind} request cannot join a running task")
                encoded.append(self.encode(request))
            except TpmError as error:
                if isinstance(request_id, str):
                    self._answer(request_id, refused(error))
        return encoded
