"""A request that makes its backend raise fails alone; its batch-mates are still answered.

A handler answers its kind's requests together, in one backend call. When
that call raises (an error no check foresaw: a value the backend cannot
take, a fault in the engine), every request of the batch used to fail with
it, and callers who share nothing with the offender lost their answers.
Here the group is split in halves, each run again, until every request
that still makes the backend raise is alone: it gets a typed error outcome
(and so is not charged), the others their answers. Splitting in halves
finds one bad request among ``n`` in about ``2 log2 n`` calls, where one
call per request would run the whole batch again one by one.

The runs after the first go without the back channel: streamed text is not
sent twice and no request joins a batch being retried (the result carries
the text, and the service sends what the stream had not); requests the
channel already answered keep those answers, settled once by the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from functions.outcomes import refused
from tpm_fed.protocol.errors import RemoteExecutionError, ReplicaLost, TpmError

logger = logging.getLogger(__name__)

Run = Callable[[list[Any], bool], list[dict[str, Any]]]
"""``run(requests, with_channel)``: the handler on these requests, one outcome each, in order."""


def answer_isolated(run: Run, requests: Sequence[Any], channel: Any = None) -> list[dict[str, Any]]:
    """One outcome per request: ``run`` on all of them, or, if that raises, on halves until it does not."""
    try:
        return run(list(requests), True)
    except ReplicaLost:
        raise  # the replica failed, not a request: none is answered here (the task fails, to be run again)
    except Exception as error:
        logger.exception("a batch of %d %s requests raised; answering them apart", len(requests),
                         getattr(requests[0], "kind", "?"))
        first_error = error
    answered = channel.answers if channel is not None else {}
    outcomes: list[dict[str, Any] | None] = [answered.get(r.request_id) for r in requests]
    unanswered = [index for index, outcome in enumerate(outcomes) if outcome is None]
    again = _split([requests[i] for i in unanswered], run, first_error)
    for index, outcome in zip(unanswered, again, strict=True):
        outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def _split(requests: list[Any], run: Run, error: Exception) -> list[dict[str, Any]]:
    """``requests`` made ``run`` raise ``error`` together: each half runs on its own."""
    if len(requests) <= 1:
        return [failed_alone(error) for _ in requests]
    middle = len(requests) // 2
    return _retry(requests[:middle], run) + _retry(requests[middle:], run)


def _retry(requests: list[Any], run: Run) -> list[dict[str, Any]]:
    try:
        return run(requests, False)
    except ReplicaLost:
        raise
    except Exception as error:
        return _split(requests, run, error)


def failed_alone(error: Exception) -> dict[str, Any]:
    """The outcome of a request the backend raised on, alone: typed, so the service charges nothing.

    Our own errors keep their type; anything else becomes :class:`RemoteExecutionError` naming
    only the exception's type (its text may hold a path; the traceback is in the worker's log).
    """
    if isinstance(error, TpmError):
        return refused(error)
    logger.error("a request raised %s on its own", type(error).__name__, exc_info=error)
    return refused(RemoteExecutionError(
        f"the backend raised {type(error).__name__} on this request alone; the requests batched with it "
        "were answered, and it was not charged"))
