"""``session``: each session's steps in order on this replica (:mod:`functions.interventions.session`)."""

from __future__ import annotations

from typing import Any

from functions.backends.base import Traces
from functions.outcomes import refused
from functions.policy import WorkerPolicy
from functions.references import deliver
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.sessions import SessionRequest


def handle(backend: Traces, requests: list[SessionRequest], policy: WorkerPolicy) -> list[dict[str, Any]]:
    """Run each session; a refused one (a bad step, too large a result) costs the others nothing."""
    from functions.interventions.session import run_session
    from tpm_fed.protocol.tensors import pack_tensors

    outcomes = []
    for session in requests:
        try:
            tensors, reply = run_session(backend.tracer, session, policy=policy)
            # Usage counts the steps' tensor bytes (not the blob's framing): the session is charged line by line.
            outcomes.append({"result": {**reply, **deliver(pack_tensors(tensors), policy)}})
        except TpmError as error:
            outcomes.append(refused(error))
    return outcomes
