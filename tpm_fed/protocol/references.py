"""Results by reference: where a large result's tensors wait, instead of travelling in the reply.

Globus Compute carries at most 10 MB back from a task, and one layer's
residual stream of a long prompt on a large model is tens of megabytes. A
worker whose endpoint names a result store (``TPM_RESULT_STORE``,
:mod:`functions.policy`) writes a result's safetensors blob there, in chunks,
when it is over the endpoint's inline threshold, and the reply carries a
:class:`TensorsReference` instead of the bytes. The store is a ProxyStore
connector (a shared file system here; Redis or endpoint-to-endpoint
elsewhere, :mod:`tpm_fed.storage.result_stores`).

Chunks, rather than one object, let a reader stream a result of any size to
disk with one chunk in memory, through any connector.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes per stored chunk: what a reader holds in memory at once."""

MAX_REFERENCE_BYTES = 4 * 1024 ** 3
"""The most tensor bytes one result may hold by reference (a site's own limit may be lower)."""

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
"""A 256-bit digest in hex."""

Key = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
"""A chunk's key in its store: a plain name, never a path (a reference cannot point outside its store)."""


class TensorsReference(BaseModel):
    """A result's tensors (one safetensors blob), stored next to the site that made them.

    Attributes:
        store: The site's result store, as a ProxyStore connector spec
            (``file:///path``, ``redis://host:port``). The service fills in the
            store its federation file names for the site: a worker's own word
            is never used to choose what the service reads.
        keys: The chunks' keys, in order.
        nbytes: The blob's size.
        blake3: The blob's BLAKE3 digest (hex): a reader checks every byte against it. BLAKE3
            rather than SHA-256 because the check is the whole cost of a read (SHA-256 hashes
            ~1.6 GB/s on one core; BLAKE3 is several times that, and spreads over cores).
        sha256: The blob's SHA-256 (hex), in references written before BLAKE3 (still checked).
        expires_at: When the site may drop it (epoch seconds); reading it later is
            :class:`~tpm_fed.protocol.errors.ReferenceExpired`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(min_length=1, max_length=1024)
    keys: list[Key] = Field(min_length=1, max_length=MAX_REFERENCE_BYTES // CHUNK_BYTES + 1)
    nbytes: int = Field(ge=0, le=MAX_REFERENCE_BYTES)
    blake3: Digest | None = None
    sha256: Digest | None = None
    expires_at: float

    @model_validator(mode="after")
    def _a_digest(self) -> Self:
        if self.blake3 is None and self.sha256 is None:
            raise ValueError("a reference names its blob's digest (blake3, or sha256 in older ones)")
        return self

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)
