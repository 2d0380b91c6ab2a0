"""Payload limits: Globus Compute refuses tasks and results over 10 MB.

A request that could not fit in a task is refused where it enters (no
service units charged); batches are capped by bytes as well as by count, so
coalescing never builds a task the service would refuse; an oversized result
comes back as :class:`PayloadTooLarge`.
"""

from __future__ import annotations

import json

from tpm_fed.protocol.errors import PayloadTooLarge
from tpm_fed.protocol.requests import ServingRequest

MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
"""Globus Compute's limit on a task's (and a result's) serialized size."""

MAX_RESULT_BYTES = MAX_PAYLOAD_BYTES - 64 * 1024
"""The most tensor bytes one request may get back (the rest is room for the reply's framing)."""

ENVELOPE_BYTES = 64 * 1024
"""Room kept for the function, the model spec and the serializer's framing."""


def request_bytes(request: ServingRequest) -> int:
    """Bytes the request takes in a task (its JSON form; serialization adds a little)."""
    return len(json.dumps(request.to_wire()))


def check_request_size(request: ServingRequest) -> int:
    """The request's size in bytes.

    Raises:
        PayloadTooLarge: It cannot fit in one task.
    """
    size = request_bytes(request)
    if size > MAX_PAYLOAD_BYTES - ENVELOPE_BYTES:
        raise PayloadTooLarge(
            f"request is {size:,} bytes; a Globus Compute task holds at most "
            f"{MAX_PAYLOAD_BYTES - ENVELOPE_BYTES:,} (split the prompts into several requests; "
            "results by reference come later)"
        )
    return size
