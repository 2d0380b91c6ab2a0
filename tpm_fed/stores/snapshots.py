"""Snapshots: each change of a store's files makes a new, immutable snapshot named by its content.

A snapshot's id is the first 16 hex digits of a SHA-256 over what a search of it depends on: the embedding
model and its exact version, the index parameters, and every chunk (file id, filename, position, text,
attributes) with its vector's bytes. The same content always gets the same id; any change (a file added,
removed or replaced, an attribute, a new model version) gets a new one. A snapshot's files are written
into a private staging folder and renamed into place whole, so a failed build leaves nothing half-made,
and the store's current snapshot is only moved to it afterwards (in the database). Old snapshots stay on
disk, searchable by ``store@snapshot``, until ``tpm stores gc`` collects them.

Layout under the home (folders 0700, files 0600)::

    stores/<store>/files/<key>/{chunks.json,vectors.npy}     one file's chunks and vectors (reused by later
                                                              snapshots: only new files are embedded)
    stores/<store>/snapshots/<snapshot>/{manifest.json,chunks.json,vectors.npy,index/,lexical/}

The dense index (exact, or HNSW from :data:`~tpm_fed.stores.index.APPROXIMATE_FROM` chunks) and the BM25
index of :mod:`tpm_fed.stores.index` and :mod:`tpm_fed.stores.lexical` are built once, with the snapshot,
and loaded with it; the index's parameters are part of the content id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpm_fed.protocol.errors import InvalidRequest, NotPermitted



@dataclass(frozen=True)
class ChunkRecord:
    """A chunk as a snapshot keeps it (and as a search result and a citation name it)."""

    file_id: str
    filename: str
    index: int
    text: str
    start: int
    end: int
    attributes: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "filename": self.filename, "index": self.index, "text": self.text,
                "start": self.start, "end": self.end, "attributes": self.attributes}


@dataclass(frozen=True)
class FileArtifact:
    """One file's chunks and their vectors, as embedded once for a model version."""

    chunks: list[ChunkRecord]
    vectors: np.ndarray


@dataclass
class Snapshot:
    """A loaded snapshot: its chunks, their vectors, its indexes, and what made them."""

    store_id: str
    snapshot_id: str
    model: str
    model_version: str
    chunks: list[ChunkRecord]
    vectors: np.ndarray
    index_params: dict[str, Any]
    index: Any = None
    """The dense index (:class:`~tpm_fed.stores.index.VectorIndex`), chunk positions as ids."""
    lexical: Any = None
    """The BM25 index (:class:`~tpm_fed.stores.lexical.LexicalIndex`) of the chunks' texts."""
    _keys: set[str] | None = None
    _files: tuple[np.ndarray, list[dict[str, Any]]] | None = None

    def files(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Each chunk's file as a position, and each file's attributes (attributes are a file's: a filter is
        evaluated once per file, not once per chunk)."""
        if self._files is None:
            positions: dict[str, int] = {}
            attributes: list[dict[str, Any]] = []
            for chunk in self.chunks:
                if chunk.file_id not in positions:
                    positions[chunk.file_id] = len(attributes)
                    attributes.append(chunk.attributes)
            self._files = (np.array([positions[c.file_id] for c in self.chunks], dtype=np.int64), attributes)
        return self._files

    def attribute_keys(self) -> set[str]:
        """Every attribute a chunk of the snapshot has (computed once: it is asked on every filtered search)."""
        if self._keys is None:
            self._keys = {key for chunk in self.chunks for key in chunk.attributes}
        return self._keys


def content_id(model: str, model_version: str, index_params: dict[str, Any], chunks: list[ChunkRecord],
               vectors: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model, "model_version": model_version, "index": index_params,
                              "chunks": [chunk.wire() for chunk in chunks]}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    return digest.hexdigest()[:16]


class SnapshotFiles:
    """The stores' files under ``root`` (the home's ``stores`` folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    # ----- per-file artifacts ---------------------------------------------------------
    def artifact_dir(self, store_id: str, key: str) -> Path:
        return self.root / store_id / "files" / key

    def read_artifact(self, store_id: str, key: str) -> FileArtifact | None:
        folder = self.artifact_dir(store_id, key)
        if not (folder / "vectors.npy").is_file():
            return None
        chunks = [ChunkRecord(**row) for row in json.loads((folder / "chunks.json").read_text())]
        return FileArtifact(chunks, np.load(folder / "vectors.npy", allow_pickle=False))

    def write_artifact(self, store_id: str, key: str, artifact: FileArtifact) -> None:
        self._write_folder(self.artifact_dir(store_id, key), {
            "chunks.json": json.dumps([chunk.wire() for chunk in artifact.chunks]).encode()}, artifact.vectors)

    # ----- snapshots ----------------------------------------------------------------
    def snapshot_dir(self, store_id: str, snapshot_id: str) -> Path:
        return self.root / store_id / "snapshots" / snapshot_id

    def build(self, store_id: str, model: str, model_version: str, artifacts: list[FileArtifact]) -> Snapshot:
        """Write the snapshot of these files' chunks (or find it written already: the same content)."""
        from tpm_fed.stores.index import build_index
        from tpm_fed.stores.lexical import LexicalIndex

        chunks = [chunk for artifact in artifacts for chunk in artifact.chunks]
        dims = next((a.vectors.shape[1] for a in artifacts if a.vectors.size), 0)
        vectors = (np.concatenate([a.vectors for a in artifacts if a.vectors.size])
                   if chunks else np.zeros((0, dims), dtype=np.float32)).astype(np.float32)
        index = build_index(np.arange(len(chunks)), vectors) if chunks else None
        lexical = LexicalIndex.build([chunk.text for chunk in chunks]) if chunks else None
        params = dict(index.params) if index is not None else {"kind": "empty"}
        snapshot_id = content_id(model, model_version, params, chunks, vectors)
        snapshot = Snapshot(store_id, snapshot_id, model, model_version, chunks, vectors, params, index, lexical)
        folder = self.snapshot_dir(store_id, snapshot_id)
        if not (folder / "manifest.json").is_file():
            manifest = {"store_id": store_id, "snapshot_id": snapshot_id, "model": model,
                        "model_version": model_version, "index": params, "chunks": len(chunks)}

            def indexes(staging: Path) -> None:
                if index is not None:
                    index.save(staging / "index")
                    lexical.save(staging / "lexical")

            self._write_folder(folder, {"manifest.json": json.dumps(manifest).encode(),
                                        "chunks.json": json.dumps([c.wire() for c in chunks]).encode()}, vectors,
                               indexes)
        return snapshot

    def load(self, store_id: str, snapshot_id: str) -> Snapshot:
        """A snapshot, from memory when it was loaded lately.

        Raises:
            NotPermitted: No such snapshot of this store, or collected.
        """
        key = (store_id, snapshot_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        folder = self.snapshot_dir(store_id, snapshot_id)
        if not (folder / "manifest.json").is_file():
            raise NotPermitted(f"no snapshot {snapshot_id!r} of store {store_id!r} (never made, or collected "
                               "by tpm stores gc)")
        manifest = json.loads((folder / "manifest.json").read_text())
        chunks = [ChunkRecord(**row) for row in json.loads((folder / "chunks.json").read_text())]
        snapshot = Snapshot(store_id, snapshot_id, manifest["model"], manifest["model_version"], chunks,
                            np.load(folder / "vectors.npy", allow_pickle=False), manifest["index"])
        if chunks:
            from tpm_fed.stores.index import load_index
            from tpm_fed.stores.lexical import LexicalIndex

            snapshot.index = load_index(folder / "index")
            snapshot.lexical = LexicalIndex.load(folder / "lexical")
        with self._lock:
            self._cache[key] = snapshot
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        return snapshot

    def remove(self, store_id: str, snapshot_id: str | None = None) -> None:
        """Remove a snapshot's files (or, without one, the whole store's)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == store_id and snapshot_id in (None, k[1])]:
                del self._cache[key]
        target = self.root / store_id if snapshot_id is None else self.snapshot_dir(store_id, snapshot_id)
        shutil.rmtree(target, ignore_errors=True)

    def _write_folder(self, folder: Path, files: dict[str, bytes], vectors: np.ndarray, more: Any = None) -> None:
        """Write ``folder`` whole or not at all: into a private staging folder, then renamed into place."""
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for parent in (self.root, *folder.parents):
            if parent == self.root.parent:
                break
            os.chmod(parent, 0o700)
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            for name, data in files.items():
                _write_private(staging / name, data)
            descriptor = os.open(staging / "vectors.npy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
            if more is not None:
                more(staging)
        except BaseException:  # nothing half-written stays behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.rename(staging, folder)
        except OSError:  # written meanwhile by another build of the same content: theirs is the same
            shutil.rmtree(staging, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def parse_store_ref(text: str) -> tuple[str, str | None]:
    """``vs_ID`` or ``vs_ID@SNAPSHOT`` -> (store id, snapshot id or None)."""
    store_id, _, snapshot = text.partition("@")
    if not store_id or (snapshot == "" and "@" in text):
        raise InvalidRequest(f"{text!r}: a store is named STORE or STORE@SNAPSHOT")
    return store_id, snapshot or None
