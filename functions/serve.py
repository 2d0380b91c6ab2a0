"""The serving functions registered with Globus Compute.

They take and return plain JSON-ready data, so any client that can build the
dicts can call them, and a worker never unpickles our classes. Every request
in a batch gets its own outcome: one bad request is refused alone and the
others still run. Errors we expect (bad input, a model that will not load)
come back as typed data; anything else raises, and the endpoint reports it
with its traceback.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any


def generate_batch(model: dict[str, Any], requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer a batch of generation requests on this worker's replica of ``model``.

    Args:
        model: A :class:`~tpm_fed.models.spec.ModelSpec` as a dict.
        requests: :class:`~tpm_fed.request.GenerationRequest` dicts.

    Returns:
        ``{"replica": ReplicaInfo dict or None, "backend", "load_s", "run_s",
        "notes", "outcomes": [{"result": {...}} | {"error": {"type", "message"}}]}``;
        a result holds ``completions`` and ``usage``.
    """
    from functions.backends.base import EncodedRequest
    from functions.replica_cache import REPLICAS
    from tpm_fed.errors import TpmError
    from tpm_fed.models.spec import ModelSpec
    from tpm_fed.request import GenerationRequest
    from tpm_fed.result import Usage

    spec = ModelSpec.from_wire(model)
    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    reply: dict[str, Any] = {"replica": None, "backend": spec.backend, "load_s": 0.0, "run_s": 0.0}

    try:
        replica, warm = REPLICAS.get(spec)
    except TpmError as error:
        reply["outcomes"] = [{"error": error.to_wire()}] * len(requests)
        return reply

    encoded: list[tuple[int, EncodedRequest]] = []
    for index, wire in enumerate(requests):
        try:
            encoded.append((index, replica.backend.encode(GenerationRequest.from_wire(wire))))
        except TpmError as error:
            outcomes[index] = {"error": error.to_wire()}

    started = time.perf_counter()
    if encoded:
        answers = replica.backend.generate([item for _, item in encoded])
        for (index, item), completions in zip(encoded, answers, strict=True):
            usage = Usage(
                prompt_tokens=item.prompt_tokens,
                completion_tokens=sum(len(c.token_ids) for c in completions),
            )
            outcomes[index] = {
                "result": {
                    "completions": [c.to_wire() for c in completions],
                    "usage": usage.to_wire(),
                }
            }
    reply.update(
        backend=replica.backend.name,
        load_s=0.0 if warm else replica.load_s,
        run_s=time.perf_counter() - started,
        notes=replica.notes,
        outcomes=outcomes,
        replica={
            "replica_id": replica.replica_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "warm": warm,
            "batch_size": len(encoded),
        },
    )
    return reply


def worker_info() -> dict[str, Any]:
    """Where this worker is and which model versions it holds warm."""
    from functions.replica_cache import REPLICAS

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "loaded": [spec.to_wire() for spec in REPLICAS.loaded()],
    }


def echo(value: Any) -> Any:
    """Return the argument: the bare round trip benchmarks compare against."""
    return value
