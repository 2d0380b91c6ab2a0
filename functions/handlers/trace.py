"""``trace`` (mode 3): each request is its own forward pass (or generation) with hooks in place."""

from __future__ import annotations

from typing import Any

from functions.backends.base import Traces
from functions.outcomes import refused
from functions.policy import WorkerPolicy
from functions.references import deliver
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.requests import TraceRequest


def handle(backend: Traces, requests: list[TraceRequest], policy: WorkerPolicy) -> list[dict[str, Any]]:
    """Run each trace; a refused one (bad position, result too large, caller code here) costs the others nothing."""
    outcomes = []
    for request in requests:
        try:
            result = backend.tracer.run(request, policy=policy)
            outcomes.append({"result": {**result, **deliver(result.pop("tensors_blob"), policy)}})
        except TpmError as error:
            outcomes.append(refused(error))
    return outcomes
