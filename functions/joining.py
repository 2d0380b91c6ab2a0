"""Requests joining a task while it runs: the worker's end of joining (continuous batching).

The endpoint engine runs one task at a time per worker. Without more, a
request that arrives while a replica generates waits for the whole task to
end (vLLM's own server would take it in at the next step). So while a vLLM
task runs, the service pushes the requests queued for this replica down the
task's channel (:class:`functions.back_channel.BackChannel`) as they come,
once the engine said it takes them (its first :meth:`JoinableTask.joined`).
What arrives joins the running engine at its next step, and each joined
request is answered on the channel when it finishes
(:meth:`functions.back_channel.BackChannel.answer`).

- The service decides what may join: requests of this task's replica, as
  many as the task has room for, for a bounded time; it reserves their
  service units before pushing them, as for any task.
- When its engine runs dry, the worker stops taking joiners
  (:meth:`JoinableTask.close`) and serves what arrived before the service
  heard it; the task's result lists every joined request's outcome
  (``joined``), so a lost answer on the channel loses nothing, and a request
  pushed that the worker never read goes back to the replica's queue.
- A dropped socket does not end joining: the channel is opened again and what was pushed meanwhile arrives
  once (:mod:`functions.back_channel`). A channel that fails for good ends joining for the task; what already
  joined still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from functions.back_channel import BackChannel
from functions.backends.base import EncodedRequest
from functions.batch_rows import is_batch_line
from functions.outcomes import generated, refused
from tpm_fed.protocol.errors import InvalidRequest, TpmError
from tpm_fed.protocol.kinds import KINDS, request_from_wire
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion

IDLE_JOIN_WAIT_S = 1.0
"""How long a task whose engine ran dry still waits for a request to join before it ends. Ending at
once loses the replica's warm task in every gap between requests: a caller who sends again as soon
as its answer arrives (a chat, a benchmark client, a batch runner's next line) reaches the service
a few milliseconds too late, and its first token then pays a task's start (100-360 ms here; the
16-stream runs started 19-21 tasks for 64 requests). A request of a kind that cannot join waits
at most this much longer for the replica."""


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
        return self._encoded(self.channel.take_joined())

    def idle_joined(self, timeout_s: float = IDLE_JOIN_WAIT_S) -> list[EncodedRequest]:
        """The engine ran dry: requests that join within ``timeout_s`` (none once joining has ended)."""
        return self._encoded(self.channel.wait_joined(timeout_s))

    def close(self) -> list[EncodedRequest]:
        """No more may join; those that joined meanwhile (they run before the task ends)."""
        return self._encoded(self.channel.take_no_more())

    def finished(self, item: EncodedRequest, completions: list[Completion]) -> None:
        """``item`` is done: answer its caller now, not at the end of the batch (an interactive request's
        answer at once; a batch line's with the next frame, as text is sent)."""
        self._answer(item.request.request_id, generated(item, completions),
                     urgent=not is_batch_line(item.request.priority))

    def _answer(self, request_id: str, outcome: dict[str, Any], urgent: bool = False) -> None:
        started = self._started.pop(request_id, None)
        self.channel.answer(request_id, outcome, 0.0 if started is None else time.perf_counter() - started,
                            urgent=urgent)

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
