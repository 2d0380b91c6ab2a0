"""A blob in a ProxyStore connector as a run of chunks, read back with its digest checked."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

from tpm_fed.protocol.errors import ReferenceCorrupt, ReferenceExpired, ReferenceNotFound
from tpm_fed.protocol.references import CHUNK_BYTES, TensorsReference
from tpm_fed.storage.result_stores import key_for, key_name


def put_chunks(connector: Any, blob: bytes | memoryview, *, store: str, retention_s: float) -> TensorsReference:
    """Write ``blob`` to ``connector`` in :data:`CHUNK_BYTES` pieces; the reference that reads it back."""
    view = memoryview(blob)
    keys = [key_name(connector.put(view[start:start + CHUNK_BYTES]))
            for start in range(0, max(len(view), 1), CHUNK_BYTES)]
    return TensorsReference(store=store, keys=keys, nbytes=len(view), sha256=hashlib.sha256(view).hexdigest(),
                            expires_at=time.time() + retention_s)


def check_current(reference: TensorsReference, now: float | None = None) -> None:
    """Raises :class:`ReferenceExpired` once the reference is past its retention."""
    if (now or time.time()) > reference.expires_at:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reference.expires_at))
        raise ReferenceExpired(f"this result's tensors expired at {expired} (the site keeps results by reference "
                               "only so long); run the request again")


def get_chunks(connector: Any, reference: TensorsReference) -> Iterator[bytes]:
    """The blob's chunks in order; the digest is checked as they pass, and a mismatch raises at the end.

    Raises:
        ReferenceExpired: Past its retention (checked before anything is read).
        ReferenceNotFound: A chunk is not in the store.
        ReferenceCorrupt: The bytes are not the ones the worker wrote.
    """
    check_current(reference)
    missing = [name for name in reference.keys if not connector.exists(key_for(connector, name))]
    if missing:
        raise ReferenceNotFound(f"the result store holds no chunk {missing[0]!r} of this result "
                                f"({len(missing)} of {len(reference.keys)} missing)")

    def stored() -> Iterator[bytes]:
        for name in reference.keys:
            chunk = connector.get(key_for(connector, name))
            if chunk is None:  # evicted between the check and the read
                raise ReferenceNotFound(f"chunk {name!r} of this result left the store while it was read")
            yield chunk

    return checked(stored(), reference, "the stored result")


def checked(chunks: Iterator[bytes], reference: TensorsReference, what: str) -> Iterator[bytes]:
    """``chunks`` passed through, hashed as they pass; :class:`ReferenceCorrupt` at the end if they are
    not the bytes the reference describes."""
    digest, seen = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        seen += len(chunk)
        yield chunk
    if seen != reference.nbytes or digest.hexdigest() != reference.sha256:
        raise ReferenceCorrupt(f"{what} is {seen:,} bytes with digest {digest.hexdigest()[:12]}...; "
                               f"its reference says {reference.nbytes:,} bytes, {reference.sha256[:12]}...")


def evict_chunks(connector: Any, reference: TensorsReference) -> None:
    for name in reference.keys:
        connector.evict(key_for(connector, name))
