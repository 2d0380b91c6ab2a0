"""The digest that guards results by reference: BLAKE3, checked beside the reads, as strict as before.

A flipped byte anywhere, a chunk swapped, or a short blob is :class:`ReferenceCorrupt`; a reference
written before BLAKE3 (SHA-256 only) still reads and is still checked.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from blake3 import blake3

from tpm_fed.protocol.errors import ReferenceCorrupt
from tpm_fed.storage.reference_chunks import get_chunks, put_chunks
from tpm_fed.protocol.references import CHUNK_BYTES, TensorsReference
from tpm_fed.storage.result_stores import connector_for, key_for


@pytest.fixture()
def stored(tmp_path):
    spec = f"file://{tmp_path / 'results'}"
    connector = connector_for(spec, create=True)
    blob = os.urandom(2 * CHUNK_BYTES + 12345)
    return connector, blob, put_chunks(connector, blob, store=spec, retention_s=600)


def _flip_a_byte_in_chunk(connector, reference, index: int) -> None:
    path = os.path.join(connector.store_dir, key_for(connector, reference.keys[index]).filename)
    with open(path, "r+b") as handle:  # the stored file itself, as decay or tampering would change it
        handle.seek(os.path.getsize(path) // 3)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x80]))


def test_a_reference_carries_the_blobs_blake3_and_reads_back_whole(stored):
    connector, blob, reference = stored
    assert reference.blake3 == blake3(blob).hexdigest() and reference.sha256 is None
    assert b"".join(get_chunks(connector, reference)) == blob


@pytest.mark.parametrize("index", [0, 2])
def test_a_flipped_byte_in_any_chunk_is_corrupt(stored, index):
    connector, _, reference = stored
    _flip_a_byte_in_chunk(connector, reference, index)
    with pytest.raises(ReferenceCorrupt, match="digest"):
        list(get_chunks(connector, reference))


def test_a_wrong_digest_or_length_is_corrupt(stored):
    connector, _, reference = stored
    with pytest.raises(ReferenceCorrupt):
        list(get_chunks(connector, reference.model_copy(update={"blake3": "0" * 64})))
    with pytest.raises(ReferenceCorrupt):
        list(get_chunks(connector, reference.model_copy(update={"nbytes": reference.nbytes + 1})))


def test_an_older_sha256_reference_still_reads_and_is_still_checked(stored):
    connector, blob, reference = stored
    older = reference.model_copy(update={"blake3": None, "sha256": hashlib.sha256(blob).hexdigest()})
    assert b"".join(get_chunks(connector, older)) == blob
    with pytest.raises(ReferenceCorrupt):
        list(get_chunks(connector, older.model_copy(update={"sha256": "f" * 64})))


def test_a_reference_without_a_digest_is_refused():
    with pytest.raises(ValueError, match="digest"):
        TensorsReference.model_validate({"store": "file:///x", "keys": ["a"], "nbytes": 1, "expires_at": 0})


def test_a_reader_that_stops_early_leaves_nothing_running(stored):
    connector, blob, reference = stored
    chunks = get_chunks(connector, reference)
    assert next(chunks) == blob[:CHUNK_BYTES]
    chunks.close()  # the helper thread is joined, not left hashing


def test_a_file_stores_chunks_are_mapped_views_that_outlive_their_eviction(stored):
    """The file store's fast path: views of the mapped chunk files, not copies (the digest is then the
    only pass over the bytes); an evicted chunk's file is unlinked, and a view already handed out stays
    readable."""
    connector, blob, reference = stored
    views = list(get_chunks(connector, reference))
    assert all(isinstance(view, memoryview) for view in views)
    for name in reference.keys:
        connector.evict(key_for(connector, name))
    assert b"".join(views) == blob


def test_a_chunk_evicted_while_the_result_is_read_is_not_found(stored):
    from tpm_fed.protocol.errors import ReferenceNotFound

    connector, blob, reference = stored
    chunks = get_chunks(connector, reference)
    assert bytes(next(chunks)) == blob[:CHUNK_BYTES]
    connector.evict(key_for(connector, reference.keys[1]))
    with pytest.raises(ReferenceNotFound, match="left the store"):
        list(chunks)


def test_an_empty_result_reads_back_empty(tmp_path):
    spec = f"file://{tmp_path / 'results'}"
    connector = connector_for(spec, create=True)
    reference = put_chunks(connector, b"", store=spec, retention_s=600)
    assert b"".join(get_chunks(connector, reference)) == b""


class _NotAFileStore:
    """A connector that only gets and puts (Redis-like): read through ``get``, not mapped."""

    def __init__(self, connector) -> None:
        self._connector = connector

    def __getattr__(self, name):
        if name == "store_dir":
            raise AttributeError(name)
        return getattr(self._connector, name)


def test_a_store_that_is_not_a_folder_is_read_through_its_connector_and_still_checked(stored):
    connector, blob, reference = stored
    other = _NotAFileStore(connector)
    chunks = list(get_chunks(other, reference))
    assert all(isinstance(chunk, bytes) for chunk in chunks) and b"".join(chunks) == blob
    _flip_a_byte_in_chunk(connector, reference, 1)
    with pytest.raises(ReferenceCorrupt, match="digest"):
        list(get_chunks(other, reference))
