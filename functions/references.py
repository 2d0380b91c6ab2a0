"""A result's tensors, inline in the reply or left in the endpoint's result store.

The reply of a Globus Compute task holds at most 10 MB. A result larger than
the endpoint's inline threshold is written to its result store (a ProxyStore
connector the operator names, :mod:`functions.policy`) and the reply carries
a :class:`~tpm_fed.protocol.references.TensorsReference` instead. Usage and
charge count the tensor bytes the same either way.
"""

from __future__ import annotations

from typing import Any

from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import PayloadTooLarge


def deliver(blob: bytes, policy: WorkerPolicy) -> dict[str, Any]:
    """``{"tensors_blob": blob}`` for a small result, ``{"tensors_ref": ...}`` for one left in the store.

    Raises:
        PayloadTooLarge: Over what this endpoint returns (inline without a store, or by reference).
    """
    if len(blob) > policy.result_limit:  # the tracer's estimate refuses first; this guards the estimate
        raise PayloadTooLarge(f"the result is {len(blob):,} bytes; this endpoint returns at most "
                              f"{policy.result_limit:,}")
    if policy.result_store is None or len(blob) <= policy.inline_result_bytes:
        return {"tensors_blob": blob}
    from tpm_fed.storage.reference_chunks import put_chunks
    from tpm_fed.storage.result_stores import connector_for

    connector = connector_for(policy.result_store, create=True)
    reference = put_chunks(connector, blob, store=policy.result_store, retention_s=policy.result_retention_s)
    return {"tensors_blob": b"", "tensors_ref": reference.to_wire()}
