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
