"""A blob in a ProxyStore connector as a run of chunks, read back with its digest checked.

The digest is BLAKE3 (the ``blake3`` package: Rust, SIMD, and several threads on a large
update) and is computed on a thread beside the reads, so a reader's check overlaps its next
read instead of following it: reading by reference costs about what the reads cost.

A file store's chunks are mapped (``mmap``), not read: the digest is then the only pass over the
bytes, on both cores, and the caller gets views of the page cache instead of copies. A plain read
costs one copy on one core (about 6-9 GB/s here) and BLAKE3 on the other about 4.4 GB/s, so checked
reads were 0.47x unchecked ones; mapped, the digest runs at about 8.6 GB/s on two threads.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tpm_fed.protocol.errors import ReferenceCorrupt, ReferenceExpired, ReferenceNotFound
from tpm_fed.protocol.references import CHUNK_BYTES, TensorsReference
from tpm_fed.storage.result_stores import key_for, key_name


def put_chunks(connector: Any, blob: bytes | memoryview, *, store: str, retention_s: float) -> TensorsReference:
    """Write ``blob`` to ``connector`` in :data:`CHUNK_BYTES` pieces; the reference that reads it back."""
    view = memoryview(blob)
    keys = [key_name(connector.put(view[start:start + CHUNK_BYTES]))
            for start in range(0, max(len(view), 1), CHUNK_BYTES)]
    return TensorsReference(store=store, keys=keys, nbytes=len(view), blake3=blake3_of(view),
                            expires_at=time.time() + retention_s)


def blake3_of(data: bytes | memoryview) -> str:
    """BLAKE3 of ``data``, hashed on every core this process may use."""
    from blake3 import blake3

    return blake3(data, max_threads=blake3.AUTO).hexdigest()


def _hasher(reference: TensorsReference) -> Any:
    """A hasher of the reference's own algorithm (BLAKE3; SHA-256 for older references)."""
    if reference.blake3 is not None:
        from blake3 import blake3

        return blake3(max_threads=blake3.AUTO)
    return hashlib.sha256()


def check_current(reference: TensorsReference, now: float | None = None) -> None:
    """Raises :class:`ReferenceExpired` once the reference is past its retention."""
    if (now or time.time()) > reference.expires_at:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reference.expires_at))
        raise ReferenceExpired(f"this result's tensors expired at {expired} (the site keeps results by reference "
                               "only so long); run the request again")


def get_chunks(connector: Any, reference: TensorsReference) -> Iterator[bytes | memoryview]:
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

    folder = getattr(connector, "store_dir", None)  # ProxyStore's FileConnector: one file per chunk
    if folder is not None:
        return checked(_mapped(connector, folder, reference.keys), reference, "the stored result")

    def stored() -> Iterator[bytes]:
        for name in reference.keys:
            chunk = connector.get(key_for(connector, name))
            if chunk is None:  # evicted between the check and the read
                raise ReferenceNotFound(f"chunk {name!r} of this result left the store while it was read")
            yield chunk

    return checked(stored(), reference, "the stored result")


def _mapped(connector: Any, folder: str, names: list[str]) -> Iterator[bytes | memoryview]:
    """A file store's chunks as read-only views of their mapped files, in order.

    A view keeps its mapping alive after the file is closed (and after the chunk is evicted: an
    unlinked file stays mapped). Chunk files are written once under a fresh key and never rewritten
    in place, so no mapping sees its file shrink.
    """
    for name in names:
        path = os.path.join(folder, key_for(connector, name).filename)
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size == 0:  # mmap refuses an empty file
                    yield b""
                    continue
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:  # evicted between the check and the read
            raise ReferenceNotFound(f"chunk {name!r} of this result left the store while it was read") from None
        mapping.madvise(mmap.MADV_SEQUENTIAL)
        yield memoryview(mapping)


def checked(chunks: Iterator[bytes | memoryview], reference: TensorsReference, what: str) -> Iterator[bytes]:
    """``chunks`` passed through, hashed as they pass; :class:`ReferenceCorrupt` at the end if they are
    not the bytes the reference describes.

    Each chunk is hashed on a helper thread while the next one is read (both release the GIL), in
    order: at most one chunk is being hashed at a time, so memory stays one chunk ahead.
    """
    digest, seen = _hasher(reference), 0
    expected = reference.blake3 if reference.blake3 is not None else reference.sha256
    with ThreadPoolExecutor(1, thread_name_prefix="tpm-digest") as hashing:
        pending: Future | None = None
        for chunk in chunks:
            if pending is not None:
                pending.result()
            pending = hashing.submit(digest.update, chunk)
            seen += len(chunk)
            yield chunk
        if pending is not None:
            pending.result()
    actual = digest.hexdigest()
    if seen != reference.nbytes or actual != expected:
        raise ReferenceCorrupt(f"{what} is {seen:,} bytes with digest {actual[:12]}...; "
                               f"its reference says {reference.nbytes:,} bytes, {expected[:12]}...")


def evict_chunks(connector: Any, reference: TensorsReference) -> None:
    for name in reference.keys:
        connector.evict(key_for(connector, name))
