"""The serving functions registered with Globus Compute.

They take and return plain JSON-ready data, so any client that can build the
dicts can call them, and a worker never unpickles our classes. Every request
in a batch gets its own outcome: one bad request is refused alone and the
others still run. Errors we expect (bad input, a model that will not load,
caller code this endpoint does not run) come back as typed data; anything
else raises, and the endpoint reports it with its traceback. Each kind of
request has its handler in :mod:`functions.handlers`; what a worker permits
is its endpoint's policy, :mod:`functions.policy`.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from typing import Any


def serve_batch(
    model: dict[str, Any], requests: list[dict[str, Any]], context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Answer a batch of requests of any kind on this worker's replica of ``model``.

    Anyone who may submit to the endpoint can call this with arguments of their
    choosing, so nothing here grants a permission: whether a caller's own code
    may run, where adapters live and how large a result may be are this
    endpoint's policy (:mod:`functions.policy`), set by its operator.

    Args:
        model: A :class:`~tpm_fed.protocol.model.ModelSpec` as a dict.
        requests: Request dicts; each one's ``kind`` names a row of
            :data:`tpm_fed.protocol.kinds.KINDS`.
        context: ``code_version``, the serving code the client expects (see
            :mod:`tpm_fed.protocol.code_version`): a worker with other code refuses
            the batch. ``stream``: where to send streamed requests' text as it is
            made (:mod:`functions.back_channel`; only to hosts the policy allows). Any
            other key is ignored (older clients sent ``user_code``
            and ``adapters``; a worker never took permissions from a task since).

    Returns:
        A :class:`~tpm_fed.protocol.task_reply.TaskReply`'s wire form: the replica's facts, one
        outcome per request in order, and with a back channel ``joined``: the outcomes of requests
        that joined the running batch, by request id.
    """
    from functions.outcomes import refused
    from functions.policy import current_policy
    from functions.replica_cache import REPLICAS
    from tpm_fed.protocol.errors import ReplicaLost, TpmError
    from tpm_fed.protocol.model import ModelSpec
    from tpm_fed.protocol.results import ReplicaInfo
    from tpm_fed.protocol.task_reply import ServedBy, TaskReply

    spec = ModelSpec.from_wire(model)
    try:
        _check_code_version((context or {}).get("code_version"))
        policy = current_policy()  # a malformed policy refuses everything, before a model loads
        policy.check_model_folder(spec.name, spec.path)  # a task names the folder: only the endpoint's own
        replica, warm = REPLICAS.get(spec)
    except TpmError as error:  # refused whole, before a replica: errors only
        return TaskReply(backend=spec.backend, outcomes=[refused(error)] * len(requests)).to_wire()

    from functions.back_channel import BackChannel

    started = time.perf_counter()
    served = ServedBy(
        backend=replica.backend.name, load_s=0.0 if warm else replica.load_s, notes=replica.notes,
        replica=ReplicaInfo(replica_id=replica.replica_id, host=socket.gethostname(), pid=os.getpid(), warm=warm,
                            batch_size=len(requests)))
    channel = BackChannel.for_task(context, policy)
    if channel is not None:
        channel.served = served  # sent with the requests answered before the task ends
    try:
        outcomes = answer(replica.backend, requests, policy, channel)
    except ReplicaLost:
        # A rank of a split replica died: every rank is stopped and the replica dropped, and the task
        # fails whole, as a lost worker's does, so the service runs its requests again on a fresh one.
        REPLICAS.evict(spec)
        raise
    finally:
        if channel is not None:
            channel.close()  # streamed chunks and early answers reach the service before the result does
    joined = {}
    if channel is not None:  # requests that joined the running batch (functions.joining), answered or not
        own = {request.get("request_id") for request in requests if isinstance(request, dict)}
        joined = {rid: outcome for rid, outcome in channel.unsettled().items() if rid not in own}
    answered = sum(1 for outcome in outcomes if "result" in outcome)
    reply = TaskReply(**served.model_dump(), run_s=time.perf_counter() - started, outcomes=outcomes, joined=joined)
    reply = reply.model_copy(update={"replica": served.replica.model_copy(update={"batch_size": answered})})
    return json_ready(reply.to_wire())


def json_ready(value: Any) -> Any:
    """``value`` as JSON data: tensor blobs (bytes) become URL-safe base64 text, the alphabet the
    contract's result models write and read on every wire (``tensors_blob``). The endpoint sends replies as JSON: the service reads no
    pickles from a worker."""
    if isinstance(value, bytes):
        return base64.urlsafe_b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def answer(backend: Any, requests: list[dict[str, Any]], policy: Any, channel: Any = None) -> list[dict[str, Any]]:
    """One outcome per request dict, in order.

    Requests are parsed, grouped by kind, and each group goes to its kind's
    handler (:data:`functions.handlers.HANDLERS`) when ``backend`` has the
    capability the kind needs (``KINDS[kind].capability``); otherwise the
    group is refused with ``BackendUnavailable``. A request that does not
    parse is refused alone, and so is one that makes its handler raise
    (:func:`functions.isolation.answer_isolated`): the rest of its group is answered.
    """
    from functions.backends.base import require_capability
    from functions.handlers import HANDLERS
    from functions.isolation import answer_isolated
    from functions.outcomes import refused
    from tpm_fed.protocol.errors import TpmError
    from tpm_fed.protocol.kinds import KINDS, request_from_wire

    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    by_kind: dict[str, list[tuple[int, Any]]] = {}
    for index, wire in enumerate(requests):
        try:
            request = request_from_wire(wire)
        except TpmError as error:
            outcomes[index] = refused(error)
        else:
            by_kind.setdefault(request.kind, []).append((index, request))
    for name, items in by_kind.items():
        kind = KINDS[name]
        try:
            able = require_capability(backend, kind.capability, name)
        except TpmError as error:
            answers = [refused(error)] * len(items)
        else:
            # Only a kind whose text streams gets the channel (see functions.back_channel).
            handle, streams = HANDLERS[name], kind.streams and channel is not None

            def run(group: list[Any], with_channel: bool) -> list[dict[str, Any]]:  # called before the loop moves on
                return handle(able, group, policy, **({"channel": channel} if streams and with_channel else {}))

            answers = answer_isolated(run, [request for _, request in items], channel if streams else None)
        for (index, _), outcome in zip(items, answers, strict=True):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def _check_code_version(expected: str | None) -> None:
    from tpm_fed.protocol.code_version import serving_code_version
    from tpm_fed.protocol.errors import CodeVersionMismatch

    if expected is not None and expected != serving_code_version():
        raise CodeVersionMismatch(
            f"this endpoint runs tpm-fed serving code {serving_code_version()}, the client expects "
            f"{expected}: install the client's tpm-fed at the endpoint (or the endpoint's here) "
            "and run `tpm functions register` again"
        )


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
