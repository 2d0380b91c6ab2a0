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


def serve_batch(
    model: dict[str, Any], requests: list[dict[str, Any]], context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Answer a batch of requests of any kind on this worker's replica of ``model``.

    Args:
        model: A :class:`~tpm_fed.models.spec.ModelSpec` as a dict.
        requests: Request dicts; each one's ``kind`` is ``generate``, ``trace`` or ``embed``.
        context: What the site allows: ``user_code`` (the caller's own Python runs only
            on sites their project owns) and ``adapters`` (the adapter registry's folder);
            ``code_version``, the serving code the client expects (see
            :mod:`tpm_fed.protocol.code_version`): a worker with other code refuses the batch.

    Returns:
        ``{"replica": ReplicaInfo dict or None, "backend", "load_s", "run_s",
        "notes", "outcomes": [{"result": {...}} | {"error": {"type", "message"}}]}``.
    """
    from functions.replica_cache import REPLICAS
    from tpm_fed.protocol.code_version import serving_code_version
    from tpm_fed.protocol.errors import CodeVersionMismatch, TpmError
    from tpm_fed.protocol.model import ModelSpec
    from tpm_fed.protocol.kinds import request_from_wire

    context = context or {}
    spec = ModelSpec.from_wire(model)
    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    reply: dict[str, Any] = {"replica": None, "backend": spec.backend, "load_s": 0.0, "run_s": 0.0}

    try:
        expected = context.get("code_version")
        if expected is not None and expected != serving_code_version():
            raise CodeVersionMismatch(
                f"this endpoint runs tpm-fed serving code {serving_code_version()}, the client expects "
                f"{expected}: install the client's tpm-fed at the endpoint (or the endpoint's here) "
                "and run `tpm functions register` again"
            )
        replica, warm = REPLICAS.get(spec)
    except TpmError as error:
        reply["outcomes"] = [{"error": error.to_wire()}] * len(requests)
        return reply

    by_kind: dict[str, list[tuple[int, Any]]] = {"generate": [], "trace": [], "embed": []}
    for index, wire in enumerate(requests):
        try:
            request = request_from_wire(wire)
        except TpmError as error:
            outcomes[index] = {"error": error.to_wire()}
        else:
            by_kind[request.kind].append((index, request))

    started = time.perf_counter()
    _generate(replica, by_kind["generate"], outcomes)
    _trace(replica, by_kind["trace"], outcomes, context)
    _embed(replica, by_kind["embed"], outcomes, context)
    served = sum(1 for outcome in outcomes if outcome is not None and "result" in outcome)
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
            "batch_size": served,
        },
    )
    return reply


def _generate(replica, items: list[tuple[int, Any]], outcomes: list) -> None:
    from tpm_fed.protocol.errors import TpmError
    from tpm_fed.protocol.results import Usage

    encoded = []
    for index, request in items:
        try:
            encoded.append((index, replica.backend.encode(request)))
        except TpmError as error:
            outcomes[index] = {"error": error.to_wire()}
    if not encoded:
        return
    answers = replica.backend.generate([item for _, item in encoded])
    for (index, item), completions in zip(encoded, answers, strict=True):
        usage = Usage(prompt_tokens=item.prompt_tokens, completion_tokens=sum(len(c.token_ids) for c in completions))
        outcomes[index] = {"result": {"completions": [c.to_wire() for c in completions], "usage": usage.to_wire()}}


def _trace(replica, items: list[tuple[int, Any]], outcomes: list, context: dict[str, Any]) -> None:
    from tpm_fed.protocol.errors import TpmError

    for index, request in items:
        try:
            tracer = _torch_only(replica, "traces").tracer
            outcomes[index] = {"result": tracer.run(request, allow_user_code=bool(context.get("user_code")))}
        except TpmError as error:
            outcomes[index] = {"error": error.to_wire()}


def _embed(replica, items: list[tuple[int, Any]], outcomes: list, context: dict[str, Any]) -> None:
    from functions.adapters.embed import run_embeddings
    from tpm_fed.protocol.errors import TpmError

    if not items:
        return
    try:
        backend = _torch_only(replica, "embeddings")
    except TpmError as error:
        for index, _ in items:
            outcomes[index] = {"error": error.to_wire()}
        return
    answers = run_embeddings(backend.model, [request for _, request in items],
                             registry_root=context.get("adapters"), allow_user_code=bool(context.get("user_code")))
    for (index, _), answer in zip(items, answers, strict=True):
        outcomes[index] = answer


def _torch_only(replica, what: str):
    from tpm_fed.protocol.errors import BackendUnavailable

    if replica.backend.name != "torch":
        raise BackendUnavailable(f"{what} need the torch backend; this replica runs {replica.backend.name}")
    return replica.backend


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
