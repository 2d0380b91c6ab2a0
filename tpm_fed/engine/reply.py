"""A task's reply, read with the contract's own model into one outcome per request.

The worker builds a :class:`~tpm_fed.protocol.task_reply.TaskReply`
(:func:`functions.serve.serve_batch`); the same model reads it back here
(:func:`~tpm_fed.protocol.task_reply.reply_from_wire`), so one definition of
the reply serves both ends. It is data from outside the service: a reply
whose answers cannot be matched to its requests fails them all with
:class:`~tpm_fed.protocol.task_reply.MalformedReply`; one answer that is not
an outcome, or whose result does not fit its kind, fails its own request
alone (:class:`~tpm_fed.protocol.errors.RemoteExecutionError`). Nothing here
raises: the dispatcher settles every request once and goes on serving.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from tpm_fed.engine.pending import Pending
from tpm_fed.protocol.errors import RemoteExecutionError
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.results import ServedResult, Timings
from tpm_fed.protocol.task_reply import MalformedOutcome, MalformedReply, ReadOutcome, ServedBy, TaskReply, reply_from_wire

Outcome = ServedResult | BaseException
"""What settles one request: its typed result, or the typed error it failed with."""

_READ_OUTCOME: TypeAdapter[Any] = TypeAdapter(ReadOutcome)


def read_reply(raw: Any, expected: int) -> TaskReply | MalformedReply:
    """The reply of a task of ``expected`` requests, or why none of it can be matched (never raises)."""
    try:
        return reply_from_wire(raw, requests=expected)
    except MalformedReply as error:
        return error


class ReplyReader:
    """Reads the answers of one replica's tasks (model version ``spec`` on site ``site``)."""

    def __init__(self, spec: ModelSpec, site: str) -> None:
        self.spec, self.site = spec, site

    def task(self, batch: list[Pending], reply: TaskReply | MalformedReply, finished: float) -> list[Outcome]:
        """One outcome per request the task was sent with, in order."""
        if isinstance(reply, MalformedReply):
            return [self.malformed(str(reply), whole=True)] * len(batch)
        return [self.guarded(p, answer, reply, reply.run_s, finished) for p, answer in zip(batch, reply.outcomes)]

    def early(self, served: Any, answers: dict[str, Any]) -> tuple[ServedBy | None, dict[str, Any]]:
        """The facts and answers a running task posted early (the back channel's), read by the same models
        (``served`` None: unreadable; an answer that is not an outcome is kept as malformed)."""
        try:
            facts = served if isinstance(served, ServedBy) else ServedBy.model_validate(served)
        except ValidationError:
            facts = None
        return facts, {rid: _READ_OUTCOME.validate_python(answer) for rid, answer in answers.items()}

    def guarded(self, pending: Pending, answer: Any, served: ServedBy | None, run_s: float, finished: float,
                joined: bool = False) -> Outcome:
        """The request's outcome; an answer that is not one fails it typed, alone."""
        try:
            return self._outcome(pending, answer, served, run_s, finished, joined)
        except Exception as error:
            return self.malformed(f"the answer to request {pending.request_id}: {type(error).__name__}: {error}")

    def _outcome(self, pending: Pending, answer: Any, served: ServedBy | None, run_s: float, finished: float,
                 joined: bool) -> Outcome:
        if isinstance(answer, MalformedOutcome):
            raise ValueError(answer.problem)
        if answer.error is not None:
            return answer.raised()
        if served is None or served.replica is None:  # a batch refused whole carries errors only
            raise ValueError("a result without the replica that served it")
        replica, load_s = served.replica, served.load_s
        if answer.run_s is not None:  # answered on its own: its own time in the engine
            run_s = answer.run_s
        if joined:  # it joined a replica already loaded: no cold start is its doing
            replica, load_s = replica.model_copy(update={"warm": True}), 0.0
        elapsed = finished - pending.submitted
        return KINDS[pending.request.kind].result.model_validate({
            **answer.result,
            "request_id": pending.request_id,
            "model": self.spec.name,
            "version": self.spec.version,
            "backend": served.backend,
            "site": self.site,
            "replica": replica,
            "timings": Timings(queue_s=max(0.0, elapsed - load_s - run_s), load_s=load_s, run_s=run_s),
            "notes": served.notes,
        })

    def malformed(self, what: str, whole: bool = False) -> RemoteExecutionError:
        """The typed error of a request whose answer cannot be read (``whole``: none of its task's could)."""
        error = MalformedReply if whole else RemoteExecutionError
        return error(f"site {self.site!r} sent a malformed reply ({what[:500]}); the request was not charged")
