"""Ingestion: a background thread turns a store's queued files into its next snapshot.

One pass per store with work: each queued file is read (as the identity that attached it), its text
extracted, chunked with the embedding model's tokenizer, embedded through the federation (charged to the
store's project, per token), and kept as a file artifact; then the store's next snapshot is built from
every completed file plus the new ones, and the store moves to it in one transaction with the files'
new states. A file that fails (unsupported, corrupt, empty, over the context, refused by the ledger)
is marked ``failed`` with OpenAI's ``last_error`` and is in no snapshot; the others go on. Nothing a
failure leaves is ever searched: the previous snapshot stays current until the next one is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from tpm_fed.protocol.errors import TpmError
from tpm_fed.stores.chunking import chunk_text, sizes_for
from tpm_fed.stores.documents import InvalidFile, UnsupportedFile, text_of
from tpm_fed.stores.embedder import Embedder
from tpm_fed.stores.protocol import ChunkingStrategy
from tpm_fed.stores.registry import StoreRegistry
from tpm_fed.stores.snapshots import ChunkRecord, FileArtifact, SnapshotFiles

logger = logging.getLogger(__name__)


class Ingestion:
    """Args:
        registry: The stores' rows.
        files: The stores' files on disk.
        read_upload: ``(file_id, identity) -> bytes`` of an uploaded file (``/v1/files``), as that identity.
        embedder_for: ``model -> Embedder``.
        running: Whether the runtime still runs (the thread ends when it does not).
    """

    def __init__(self, registry: StoreRegistry, files: SnapshotFiles, read_upload: Callable[[str, str], bytes],
                 embedder_for: Callable[[str], Embedder], running: Callable[[], bool] = lambda: True) -> None:
        self.running = running
        self.registry = registry
        self.files = files
        self.read_upload = read_upload
        self.embedder_for = embedder_for
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Ingestion:
        self._thread = threading.Thread(target=self._run, name="tpm-stores-ingestion", daemon=True)
        self._thread.start()
        self._wake.set()  # files a stopped service left queued
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def lock(self, store_id: str) -> threading.Lock:
        """Held while a store's snapshot changes (ingestion, removal of a file)."""
        with self._locks_lock:
            return self._locks.setdefault(store_id, threading.Lock())

    def _run(self) -> None:
        while not self._stop.is_set() and self.running():  # ends with the runtime it embeds through
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            for store_id in self.registry.stores_with_work():
                if self._stop.is_set():
                    return
                try:
                    self.ingest(store_id)
                except Exception:  # one store's trouble never stops the others' ingestion
                    logger.exception("ingestion of vector store %s failed", store_id)

    def ingest(self, store_id: str) -> None:
        """One pass over ``store_id``'s queued files (see the module's docstring)."""
        with self.lock(store_id):
            row = self.registry.store_row(store_id)
            if row is None:
                return
            embedder = self.embedder_for(row.embedding_model)
            done: dict[str, tuple[int, str]] = {}
            failed: dict[str, dict[str, str]] = {}
            for entry in self.registry.files(store_id, status="in_progress"):
                try:
                    done[entry.file_id] = self._ingest_file(store_id, row, entry, embedder)
                except TpmError as error:
                    failed[entry.file_id] = {"code": _error_code(error), "message": str(error)}
            snapshot = None
            if done:
                try:
                    snapshot = self.rebuild(store_id, row, new=done)
                except TpmError as error:
                    failed.update({file_id: {"code": "server_error", "message": str(error)} for file_id in done})
                    done = {}
            self.registry.finish(store_id, done, failed, snapshot)

    def rebuild(self, store_id: str, row: Any, new: dict[str, tuple[int, str]] | None = None,
                reason: str = "") -> dict[str, Any]:
        """Build the snapshot of the store's completed files and the ``new`` ones just ingested
        (``file id -> (bytes, sha256)``); the snapshot's row.

        Raises:
            TpmError: A completed file's chunks are not on disk for the model's current version (a new
                version of the model: its files must be ingested again).
        """
        new = new or {}
        version = self.embedder_for(row.embedding_model).version()
        entries = [entry for entry in self.registry.files(store_id)
                   if entry.status == "completed" or entry.file_id in new]
        artifacts = []
        for entry in entries:
            digest = new[entry.file_id][1] if entry.file_id in new else entry.content_sha256
            artifact = self.files.read_artifact(store_id, _artifact_key(entry, version, digest))
            if artifact is None:
                raise TpmError(f"{entry.filename!r} ({entry.file_id}) has no chunks for {row.embedding_model}@"
                               f"{version[:12]}: add it to the store again")
            attributes = json.loads(entry.attributes_json or "{}")
            artifacts.append(FileArtifact([ChunkRecord(**{**c.wire(), "attributes": attributes})
                                           for c in artifact.chunks], artifact.vectors))
        snapshot = self.files.build(store_id, row.embedding_model, version, artifacts)
        return {"snapshot_id": snapshot.snapshot_id, "model": row.embedding_model, "model_version": version,
                "index_json": json.dumps(snapshot.index_params), "files": len(entries),
                "chunks": len(snapshot.chunks), "bytes": int(snapshot.vectors.nbytes),
                "reason": reason or f"ingested {', '.join(sorted(new))}"}

    def _ingest_file(self, store_id: str, row: Any, entry: Any, embedder: Embedder) -> tuple[int, str]:
        data = self.read_upload(entry.file_id, entry.added_by)
        digest = hashlib.sha256(data).hexdigest()
        version = embedder.version()
        key = _artifact_key(entry, version, digest)
        if self.files.read_artifact(store_id, key) is not None:  # the same bytes, chunking and model: reuse
            return len(data), digest
        text = text_of(data, entry.filename)
        counter = embedder.counter()
        size, overlap = sizes_for(ChunkingStrategy.model_validate_json(entry.chunking_json), counter)
        chunks = chunk_text(text, counter, size, overlap)
        embedded = embedder.embed([chunk.text for chunk in chunks], entry.added_by, entry.project, background=True,
                                  charged=lambda ids: self.registry.record_charges(store_id, "ingest", ids))
        if embedded.version != version:
            raise TpmError(f"the embedding model changed version while {entry.filename!r} was embedded; retry")
        records = [ChunkRecord(entry.file_id, entry.filename, chunk.index, chunk.text, chunk.start, chunk.end)
                   for chunk in chunks]
        self.files.write_artifact(store_id, key, FileArtifact(records, embedded.vectors))
        return len(data), digest


def _artifact_key(entry: Any, model_version: str, digest: str | None) -> str:
    """A file's chunks depend on its bytes, its chunking and the model version: their key."""
    material = f"{entry.file_id}\n{digest}\n{entry.chunking_json}\n{model_version}"
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _error_code(error: TpmError) -> str:
    if isinstance(error, UnsupportedFile):
        return "unsupported_file"
    if isinstance(error, InvalidFile):
        return "invalid_file"
    return "server_error"
