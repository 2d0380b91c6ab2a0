"""A store version as a plain model folder, once per node, for loaders that read folders (vLLM).

vLLM loads a Hugging Face directory; the store keeps chunks. So a version
is materialized once per node into ``CACHE/<version id>/``:

- every byte is checked against its digest as it is copied (the chunk's
  name is its SHA-256), so the folder holds exactly the verified version; a
  corrupt or missing chunk stops it, naming the file or tensor, and leaves
  no folder behind;
- small files (config, tokenizer) are whole chunks: they are hard-linked
  where the file system allows (same device), else copied; weights are
  written as safetensors files (a chunk holds raw tensor bytes, a
  safetensors file needs its header in front, so no link can make one);
- it is built in a temporary sibling and renamed into place: the folder
  under the version's name is complete or absent, never partial, and two
  materializers racing on one node both end with the same folder (the
  loser's rename fails and its copy is removed);
- the cache folder and every version folder are the worker user's alone
  (0700): a model's weights are not for other local users to read.

The cache is ``model_cache`` of the endpoint's policy (``TPM_MODEL_CACHE``),
by default ``~/.cache/tpm-fed/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tpm_fed.protocol.dtypes import lookup
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.protocol.names import is_name, path_under
from tpm_fed.storage.store_reader import StoreReader

COPY_BLOCK = 8 * 1024 * 1024


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpm-fed" / "models"


def materialized_version(store: StoreReader, version: str, cache: Path) -> Path:
    """The folder holding ``version`` as a Hugging Face directory, made now if this node has none.

    Raises:
        ModelLoadError: A chunk is missing or does not match its digest (nothing is left behind).
        UnknownVersion: The store has no such version.
    """
    if not is_name(version):
        raise ModelLoadError(f"{version[:16]!r} is not a version id")
    cache = Path(cache)
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cache, 0o700)  # an existing folder too: it holds weights
    target = path_under(cache, version)
    if target.is_dir():  # only a rename makes it, so it is whole
        return target
    manifest = store.manifest(version)  # checked to hash to its id
    staging = Path(tempfile.mkdtemp(prefix=f".{version[:16]}-", dir=cache))  # 0700
    try:
        for name, chunk_id in manifest.files.items():
            _link_or_copy(store, chunk_id, path_under(staging, name), f"file {name}", version)
        by_file: dict[str, list[str]] = {}
        for name, record in manifest.tensors.items():
            by_file.setdefault(record.file, []).append(name)
        for file_name, names in by_file.items():
            _write_safetensors(store, manifest, names, path_under(staging, file_name),
                               manifest.metadata.get(file_name) or {}, version)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another materializer finished first: same bytes
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(store: StoreReader, chunk_id: str, out: Path, what: str, version: str) -> None:
    """A whole-file chunk at ``out``: hashed, then hard-linked (or copied where links cannot go)."""
    source = store.chunks.path(chunk_id)
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.link(source, out)
    except FileNotFoundError:
        raise ModelLoadError(f"version {version[:16]}: {what}: chunk {chunk_id[:16]} is missing") from None
    except OSError:  # another device, or links not allowed: copy (checked as it is copied)
        with out.open("wb") as sink:
            _copy_checked(store, [chunk_id], sink, what, version)
        return
    # The link is the chunk itself: hash what it now holds (a copy is hashed as it is made).
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        while block := handle.read(COPY_BLOCK):
            digest.update(block)
    if digest.hexdigest() != chunk_id:
        raise ModelLoadError(f"version {version[:16]}: {what}: chunk {chunk_id[:16]} is corrupt (digest mismatch)")


def _copy_checked(store: StoreReader, chunk_ids: list[str], sink, what: str, version: str) -> None:
    for chunk_id in chunk_ids:
        digest = hashlib.sha256()
        try:
            with store.chunks.path(chunk_id).open("rb") as handle:
                while block := handle.read(COPY_BLOCK):
                    digest.update(block)
                    sink.write(block)
        except FileNotFoundError:
            raise ModelLoadError(f"version {version[:16]}: {what}: chunk {chunk_id[:16]} is missing") from None
        if digest.hexdigest() != chunk_id:
            raise ModelLoadError(f"version {version[:16]}: {what}: chunk {chunk_id[:16]} is corrupt (digest mismatch)")


def _write_safetensors(store: StoreReader, manifest, names: list[str], out: Path, metadata: dict[str, str],
                       version: str) -> None:
    """One safetensors file of these tensors, in the manifest's order, each chunk checked as it is copied."""
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        record = manifest.tensors[name]
        header[name] = {"dtype": lookup(record.dtype).code, "shape": record.shape,
                        "data_offsets": [offset, offset + record.nbytes]}
        offset += record.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with out.open("wb") as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        for name in names:
            record = manifest.tensors[name]
            before = sink.tell()
            _copy_checked(store, record.chunks, sink, f"tensor {name}", version)
            if sink.tell() - before != record.nbytes:
                raise ModelLoadError(f"version {version[:16]}: tensor {name}: its chunks hold "
                                     f"{sink.tell() - before} bytes, not {record.nbytes}")
