"""What a serving task returns: the replica's facts and one outcome per request, as contract models.

The worker builds a :class:`TaskReply` (``functions.serve.serve_batch``) and
sends its wire form (JSON data, tensor blobs as URL-safe base64); the service
reads it back with :func:`reply_from_wire`. A reply is untrusted data from a
worker, so it is read so that one bad answer fails only its own request: an
item of ``outcomes`` (or ``joined``) that is not an outcome is kept as a
:class:`MalformedOutcome` naming what is wrong, while a reply whose outcomes
cannot be matched to its requests (not a list, the wrong count) is refused
whole with :class:`MalformedReply`.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tpm_fed.protocol.errors import RemoteExecutionError, TpmError, error_from_wire
from tpm_fed.protocol.results import ReplicaInfo


class WireError(BaseModel):
    """A typed error as data (:meth:`tpm_fed.protocol.errors.TpmError.to_wire`)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    message: str


class Outcome(BaseModel):
    """One request's answer: its ``result`` (the fields its kind's result model takes besides the replica's
    facts) or its ``error``; ``run_s`` when it was answered on its own (it finished before its task)."""

    model_config = ConfigDict(extra="forbid")

    result: dict[str, Any] | None = None
    error: WireError | None = None
    run_s: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.result is None) == (self.error is None):
            raise ValueError("an outcome holds a result or an error: one of them")
        return self

    @classmethod
    def refused(cls, error: TpmError) -> Outcome:
        return cls(error=WireError.model_validate(error.to_wire()))

    def raised(self) -> TpmError | None:
        """The typed error this outcome carries, rebuilt as its own type (None for a result)."""
        return None if self.error is None else error_from_wire(self.error.model_dump())

    def to_wire(self) -> dict[str, Any]:
        """As JSON-ready as its result is (a worker turns tensor blobs into base64 after)."""
        return self.model_dump(exclude_none=True)


class MalformedOutcome(BaseModel):
    """An item of a reply that is not an :class:`Outcome`: its request fails alone, with ``problem``."""

    problem: str

    def raised(self) -> TpmError:
        return RemoteExecutionError(f"not an outcome ({self.problem})")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump()


def _outcome_or_malformed(value: Any) -> Outcome | MalformedOutcome:
    if isinstance(value, (Outcome, MalformedOutcome)):
        return value
    try:
        return Outcome.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "outcome"
        return MalformedOutcome(problem=f"{where}: {first.get('msg', 'invalid')}"[:500])


ReadOutcome = Annotated[Outcome | MalformedOutcome, BeforeValidator(_outcome_or_malformed)]


class ServedBy(BaseModel):
    """The replica's facts, shared by every answer of one task (sent with early answers too)."""

    model_config = ConfigDict(extra="ignore")  # a worker of other code still gets its refusal read

    backend: str
    replica: ReplicaInfo | None = None
    """None when the batch was refused whole (e.g. before its model loaded): only errors came back."""
    load_s: float = Field(default=0.0, ge=0.0)
    notes: list[str] = []


class TaskReply(ServedBy):
    """What ``serve_batch`` returns: the replica's facts, then one outcome per request in order, and the
    outcomes of requests that joined the running task, by request id."""

    run_s: float = Field(default=0.0, ge=0.0)
    outcomes: list[ReadOutcome]
    joined: dict[str, ReadOutcome] = {}

    def to_wire(self) -> dict[str, Any]:
        """The replica's facts as they are (``replica`` None for a batch refused whole), each outcome as its own."""
        return {**self.model_dump(exclude={"outcomes", "joined"}),
                "outcomes": [outcome.to_wire() for outcome in self.outcomes],
                "joined": {rid: outcome.to_wire() for rid, outcome in self.joined.items()}}


class MalformedReply(RemoteExecutionError):
    """A reply none of whose answers can be matched to a request: every request of its task fails with it."""


def reply_from_wire(data: Any, requests: int | None = None) -> TaskReply:
    """A task's reply, read as untrusted data (see the module's docstring).

    Args:
        data: The reply as the site returned it (decoded JSON).
        requests: How many requests the task carried: the reply must answer exactly that many.

    Raises:
        MalformedReply: ``data`` is not a reply, or answers another number of requests.
    """
    try:
        reply = TaskReply.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "reply"
        raise MalformedReply(f"{where}: {first.get('msg', 'invalid')}"[:500]) from None
    if requests is not None and len(reply.outcomes) != requests:
        raise MalformedReply(f"{len(reply.outcomes)} outcomes for a batch of {requests} requests")
    return reply
