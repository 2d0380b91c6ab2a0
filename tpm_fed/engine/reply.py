"""A task's reply, read defensively into one outcome per request.

The worker's reply (:func:`functions.serve.serve_batch`) is data from outside
the service: a malformed, truncated or mismatched one fails the requests it
does not answer properly with :class:`~tpm_fed.errors.RemoteExecutionError`,
each alone, and the dispatcher goes on serving. :func:`decode_reply` is the
one place the reply's outer shape is read (the contract's own reply model
replaces it once it exists); :class:`ReplyReader` turns each answer in it into
its request's typed result or error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tpm_fed.engine.pending import Pending
from tpm_fed.protocol.errors import RemoteExecutionError, error_from_wire
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.results import ReplicaInfo, ServedResult, Timings

Outcome = ServedResult | BaseException


@dataclass
class DecodedReply:
    """A task's reply: its requests' answers in order (``outcomes``: None if unusable, with why), the
    answers of requests that joined it by id, and what the replica reports for all of them."""

    outcomes: list[Any] | None
    why_unusable: str = ""
    joined: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] | Exception = field(default_factory=dict)


def decode_reply(reply: Any, expected: int) -> DecodedReply:
    """The reply's outer shape, for a task of ``expected`` requests (never raises)."""
    joined = reply.get("joined") if isinstance(reply, dict) else None
    parts = DecodedReply(outcomes=None, joined=joined if isinstance(joined, dict) else {}, shared=shared_facts(reply))
    try:
        answers = reply["outcomes"]
        if not isinstance(answers, list):
            raise TypeError(f"outcomes is a {type(answers).__name__}, not a list")
        if len(answers) != expected:
            raise ValueError(f"{len(answers)} outcomes for a batch of {expected} requests")
    except Exception as error:  # nothing in it can be matched to a request
        parts.why_unusable = f"{type(error).__name__}: {error}"
        return parts
    parts.outcomes = answers
    return parts


def shared_facts(reply: Any) -> dict[str, Any] | Exception:
    """What the replica reports for all its answers (an error if it is malformed)."""
    try:  # a batch refused whole (e.g. a code version mismatch) has no replica: only results need it
        return {"backend": reply["backend"], "replica": ReplicaInfo.from_wire(reply["replica"]),
                "load_s": float(reply["load_s"]), "run_s": float(reply["run_s"]),
                "notes": reply.get("notes", [])}
    except Exception as error:
        return error


class ReplyReader:
    """Reads the answers of one replica's tasks (model version ``spec`` on site ``site``)."""

    def __init__(self, spec: ModelSpec, site: str) -> None:
        self.spec, self.site = spec, site

    def task(self, batch: list[Pending], reply: DecodedReply, finished: float) -> list[Outcome]:
        """One outcome per request the task was sent with, in order."""
        if reply.outcomes is None:
            return [self.malformed(reply.why_unusable)] * len(batch)
        return [self.guarded(p, answer, reply.shared, finished) for p, answer in zip(batch, reply.outcomes)]

    def guarded(self, pending: Pending, answer: Any, shared: dict[str, Any] | Exception, finished: float,
                joined: bool = False) -> Outcome:
        """The request's outcome; an answer that is not one fails it typed, alone."""
        try:
            return self._outcome(pending, answer, shared, finished, joined)
        except Exception as error:
            return self.malformed(f"the answer to request {pending.request_id}: {type(error).__name__}: {error}")

    def _outcome(self, pending: Pending, answer: Any, shared: dict[str, Any] | Exception, finished: float,
                 joined: bool) -> Outcome:
        if "error" in answer:
            error = answer["error"]
            if not isinstance(error, dict):
                raise TypeError(f"error is a {type(error).__name__}, not an object")
            return error_from_wire(error)
        if isinstance(shared, Exception):
            raise shared
        replica, load_s, run_s = shared["replica"], shared["load_s"], shared["run_s"]
        if "run_s" in answer:  # answered on its own: its own time in the engine
            run_s = float(answer["run_s"])
        if joined:  # it joined a replica already loaded: no cold start is its doing
            replica, load_s = replica.model_copy(update={"warm": True}), 0.0
        elapsed = finished - pending.submitted
        return KINDS[pending.request.kind].result.model_validate({
            **answer["result"],
            "request_id": pending.request_id,
            "model": self.spec.name,
            "version": self.spec.version,
            "backend": shared["backend"],
            "site": self.site,
            "replica": replica,
            "timings": Timings(queue_s=max(0.0, elapsed - load_s - run_s), load_s=load_s, run_s=run_s),
            "notes": shared["notes"],
        })

    def malformed(self, what: str) -> RemoteExecutionError:
        return RemoteExecutionError(f"site {self.site!r} sent a malformed reply ({what[:500]}); "
                                    "the request was not charged")
