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
            blob = pack_tensors(tensors)
            reply["usage"]["activation_bytes"] = len(blob)  # charged as the bytes that leave, as for a trace
            outcomes.append({"result": {**reply, **deliver(blob, policy)}})
        except TpmError as error:
            outcomes.append(refused(error))
    return outcomes
