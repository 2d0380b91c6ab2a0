"""The back channel's bodies: what a running task's worker posts to the service and what it hears back.

A task that streams, or that requests may join, is given in its context a
:class:`ChannelAddress` (the service's own URL and a secret made for that one
task). Its worker posts :class:`ChannelPost` (new text per prompt, and the
answers of requests that finished before the task) and reads
:class:`ChannelPostAnswer` (whose callers left); it asks for joining
requests with :class:`JoinAsk` and reads :class:`JoinAnswer`. Both ends
build and read these same models (``functions.back_channel``,
``functions.joining``; the service's back-channel routes), so a field
changes in one place.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tpm_fed.protocol.task_reply import Outcome, ServedBy

MAX_JOIN_WAIT_S = 5.0
"""The longest one ask for joining requests is held open."""

_Id = Field(min_length=1, max_length=200)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class ChannelAddress(_Body):
    """Where a task's worker posts (``.../tpm/v1/stream``), and the task's secret."""

    url: str
    token: str = _Id


class StreamedChunk(_Body):
    """New text of one prompt of one request (text since that prompt's previous chunk)."""

    request_id: str = _Id
    index: int = Field(ge=0)
    text: str


class EarlyAnswer(_Body):
    """One request's outcome, sent when it finished (before its task did)."""

    request_id: str = _Id
    outcome: Outcome


class ChannelPost(_Body):
    """A worker's post: chunks first, then early answers with the replica's facts."""

    token: str = _Id
    chunks: list[StreamedChunk]
    outcomes: list[EarlyAnswer] = []
    served: ServedBy | None = None


class ChannelPostAnswer(_Body):
    """How many chunks reached a caller, and the task's requests whose callers left (stop generating them)."""

    delivered: int = Field(ge=0)
    cancelled: list[str] = []


class JoinAsk(_Body):
    """A worker asks for requests that may join its running batch, or (``close``) says it takes no more."""

    token: str = _Id
    wait_s: float = Field(default=1.0, ge=0.0, le=MAX_JOIN_WAIT_S)
    close: bool = False


class JoinAnswer(_Body):
    """Requests (their wire form) that join the task now, and whether the worker may ask again."""

    requests: list[dict[str, Any]] = []
    open: bool
