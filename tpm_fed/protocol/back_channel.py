"""The back channel's frames: what a running task's worker and the service say to each other while it runs.

A task that streams, or that requests may join, is given in its context a
:class:`ChannelAddress` (the service's own URL and a secret made for that one
task). Its worker opens one WebSocket to that URL (compute nodes connect out;
nothing connects in to them) and keeps it for the task's life. Each message
is one JSON frame, one of these models:

- worker to service (:data:`WORKER_FRAMES`): :class:`Hello` first (the task's
  secret: it authenticates this socket for this one task), then
  :class:`Sent` (new text per prompt, and the answers of requests that
  finished before the task), :class:`OpenToJoin` once its engine can take
  requests between steps, and :class:`TakeNoMore` when it runs dry;
- service to worker (:data:`SERVICE_FRAMES`): :class:`Joined` (requests
  that join the running task, reserved, pushed as they are queued),
  :class:`Cancelled` (requests whose callers left), :class:`Settled` (early
  answers the service settled: the task's result need not carry them) and
  :class:`JoinsEnded` (nothing more will join: the answer to
  :class:`TakeNoMore`, or the service's own decision).

A channel survives a dropped connection (a compute node's link over a WAN can
drop at any time). Both ends number the frames that carry something
(``seq``: 1, 2, ...) and keep each until the other end says it has it
(the worker's ``ack`` on every frame it sends; the service's
:class:`Received`, every few frames). The service's first frame on each
socket is :class:`Welcome`: a *resume key*, made once per task. After a drop
the worker opens a new socket with the task's secret and that key
(:class:`Hello` ``resume``, ``received``), and both ends send again what the
other has not acknowledged; each end drops a frame it had already (its
``seq`` is not above the last it took). So what crossed before the drop is
taken once, and what was lost in flight is taken once after it.

Both ends build and read these same models (``functions.back_channel``,
``functions.joining``; :mod:`tpm_fed.service.routes_channel`), so a field
changes in one place. No pickle crosses: a frame is JSON text, at most
:data:`MAX_FRAME_BYTES`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tpm_fed.protocol.task_reply import Outcome, ServedBy

CHANNEL_ROUTE = "/tpm/v1/channel"
"""Where a running task's worker opens its channel (a WebSocket)."""

MAX_FRAME_BYTES = 8 * 1024 * 1024
"""The largest frame either end takes (a longer one closes the channel: code 1009)."""

REFUSED = {"Unauthenticated": 4401, "NotPermitted": 4403, "InvalidRequest": 4400}
"""Close codes (the application range, 4000-4999) for a channel the service refuses, by the error's code."""

_Id = Field(min_length=1, max_length=200)


_Seq = Field(default=None, ge=1)
"""A frame's number on its end of the channel (None: not numbered, taken as it comes)."""
_Ack = Field(default=0, ge=0)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_frame(self) -> str:
        return self.model_dump_json(exclude_none=True)


class ChannelAddress(_Body):
    """Where a task's worker opens its channel (``http(s)://.../tpm/v1/channel``, dialled as ``ws(s)://``),
    and the task's secret."""

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


# --- worker to service ---

class Hello(_Body):
    """The channel's first frame: the task's secret; after a drop, with the resume key its :class:`Welcome`
    gave and the last service frame the worker took (``received``)."""

    type: Literal["hello"] = "hello"
    token: str = _Id
    resume: str | None = Field(default=None, min_length=1, max_length=200)
    received: int = Field(default=0, ge=0)


class Sent(_Body):
    """Chunks first, then early answers with the replica's facts."""

    type: Literal["sent"] = "sent"
    chunks: list[StreamedChunk] = []
    outcomes: list[EarlyAnswer] = []
    served: ServedBy | None = None
    seq: int | None = _Seq
    ack: int = _Ack  # the last service frame the worker took


class OpenToJoin(_Body):
    """The worker's engine takes requests between its steps: push those that may join (once per task; a
    worker that never says so is pushed none)."""

    type: Literal["open_to_join"] = "open_to_join"
    seq: int | None = _Seq
    ack: int = _Ack


class TakeNoMore(_Body):
    """The worker's engine ran dry: no more requests may join (the service answers :class:`JoinsEnded`)."""

    type: Literal["take_no_more"] = "take_no_more"
    seq: int | None = _Seq
    ack: int = _Ack


WorkerFrame = Annotated[Hello | Sent | OpenToJoin | TakeNoMore, Field(discriminator="type")]
WORKER_FRAMES: TypeAdapter[Hello | Sent | OpenToJoin | TakeNoMore] = TypeAdapter(WorkerFrame)


# --- service to worker ---

class Joined(_Body):
    """Requests (their wire form) that join the running task now, their service units reserved."""

    type: Literal["joined"] = "joined"
    seq: int | None = _Seq
    requests: list[dict[str, Any]]


class Cancelled(_Body):
    """The task's requests whose callers left: stop generating them."""

    type: Literal["cancelled"] = "cancelled"
    seq: int | None = _Seq
    request_ids: list[str]


class Settled(_Body):
    """The task's requests whose early answers the service has settled: the worker need not keep them for
    the task's result (a task may serve thousands)."""

    type: Literal["settled"] = "settled"
    seq: int | None = _Seq
    request_ids: list[str]


class JoinsEnded(_Body):
    """No more requests will join this task; every :class:`Joined` the service sent came before this."""

    type: Literal["joins_ended"] = "joins_ended"
    seq: int | None = _Seq


class Welcome(_Body):
    """The service's first frame on each socket: the task's resume key (the same on every socket of the task),
    and the last worker frame it took (the worker need not send those again)."""

    type: Literal["welcome"] = "welcome"
    resume: str = _Id
    received: int = Field(ge=0)


class Received(_Body):
    """The service has taken the worker's frames up to ``seq``: the worker need not keep them."""

    type: Literal["received"] = "received"
    seq: int = Field(ge=0)


ServiceFrame = Annotated[Joined | Cancelled | Settled | JoinsEnded | Welcome | Received, Field(discriminator="type")]
SERVICE_FRAMES: TypeAdapter[Joined | Cancelled | Settled | JoinsEnded | Welcome | Received] = \
    TypeAdapter(ServiceFrame)
