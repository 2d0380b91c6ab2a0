"""What the engine shows without changing anything: where a waiting request stands, queues per replica."""

from __future__ import annotations

from typing import Any

from tpm_fed.engine.engine import Engine


def queue_place(engine: Engine, request_id: str) -> dict[str, Any] | None:
    """A request still waiting for its replica: its place in the queue and estimated start.

    None when it is not waiting (unknown, or already sent: the request log has it then).
    """
    admission = engine._bookkeeper.admission_of(request_id)
    if admission is None:
        return None
    dispatcher = engine.pool.dispatcher_of(admission)
    position = dispatcher.position(request_id) if dispatcher is not None else None
    if dispatcher is None or position is None:
        return None
    replica = engine.broker.registry.get(admission.replica_id)
    service_s = replica.service_s if replica is not None else engine.federation.site(admission.site).cold_start_s
    return {
        "request_id": request_id, "identity": admission.request.identity, "project": admission.project,
        "model": admission.request.model, "version": admission.request.version, "kind": admission.request.kind,
        "site": admission.site, "replica": admission.replica_id, "status": "waiting",
        "queue_position": position, "estimated_start_s": dispatcher.estimated_start_s(position, service_s),
    }
