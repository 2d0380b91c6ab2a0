"""A caller's request inside the engine, with the future its caller waits on.

A caller's future is settled only through :func:`resolve`, which skips one its
caller cancelled (``set_result`` on it would raise ``InvalidStateError`` and
leave the rest of its batch unanswered).
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from tpm_fed.engine.clock import now
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


@dataclass
class Pending:
    """One request, from its arrival at a replica's queue to its outcome."""

    request: ServingRequest
    future: Future[ServedResult]
    submitted: float = field(default_factory=now)
    nbytes: int = 0
    recorded: bool = False  # reserved and logged as sent (once; a request handed back keeps both)
    background: bool = False  # a batch's line: it leaves, and is reserved, after interactive requests

    @property
    def request_id(self) -> str:
        return self.request.request_id


def resolve(future: Future, outcome: Any) -> None:
    """Give a caller its outcome; one who cancelled meanwhile does not keep the others from theirs."""
    if future.done():  # cancelled by its caller while the batch ran
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled between the check and now
        pass


def pass_on(done: Future, caller: Future) -> None:
    """A second try's outcome becomes the caller's."""
    if done.cancelled():
        caller.cancel()
        return
    error = done.exception()
    resolve(caller, error if error is not None else done.result())
