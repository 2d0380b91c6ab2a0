"""Load a model version from the store inside a worker: verified, memory-mapped where possible.

Every chunk is checked as it is loaded (:meth:`ChunkStore.check`: re-hashed
unless its file is untouched since it was last hashed); a missing or
corrupt chunk, or a manifest that does not hash to its id, stops the load
with an error naming the tensor, so nothing corrupt is served. A tensor held in one chunk is
memory-mapped from the chunk file (copy-on-write: the store is never
written); a larger one is assembled in memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from tpm_fed.storage.chunks import sha256
from tpm_fed.protocol.dtypes import torch_dtype
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.storage.store_reader import StoreReader


def materialize_files(store: StoreReader, version: str) -> Path:
    """The version's config and tokenizer files in a folder (written once, atomically)."""
    target = store.root / "materialized" / version
    if target.is_dir():
        return target
    manifest = store.manifest(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    for name, chunk_id in manifest.files.items():
        data = store.chunks.read(chunk_id)
        if sha256(data) != chunk_id:
            raise ModelLoadError(f"version {version[:16]}: file {name} is corrupt in the store")
        (staging / name).write_bytes(data)
    try:
        os.replace(staging, target)
    except OSError:  # another worker materialized it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_state_dict(store: StoreReader, version: str, *, verify: bool = True) -> dict[str, Any]:
    """Every tensor of the version, each chunk checked (see :meth:`ChunkStore.check`).

    ``verify=False`` skips the check (benchmarks use it to show what it
    costs); a missing chunk is still an error.
    """
    import torch

    manifest = store.manifest(version)
    tensors = {}
    for name, record in manifest.tensors.items():
        dtype = torch_dtype(record.dtype)
        for chunk_id in record.chunks:
            if not verify:
                if not store.chunks.has(chunk_id):
                    raise ModelLoadError(f"version {version[:16]}: tensor {name}: chunk {chunk_id[:16]} is missing")
                continue
            state = store.chunks.check(chunk_id)
            if state != "ok":
                raise ModelLoadError(f"version {version[:16]}: tensor {name}: chunk {chunk_id[:16]} is {state}")
        if len(record.chunks) == 1 and record.nbytes > 0:
            flat = torch.from_file(str(store.chunks.path(record.chunks[0])), shared=False,
                                   size=record.nbytes // dtype.itemsize, dtype=dtype)
        else:
            flat = torch.frombuffer(bytearray(b"".join(store.chunks.read(c) for c in record.chunks)) or bytearray(1),
                                    dtype=torch.uint8)[: record.nbytes].view(dtype)
        tensors[name] = flat.reshape(record.shape)
    return tensors
