"""Vector stores, served: what the routes, the Responses API and the CLI (through them) call.

One :class:`Stores` per runtime. It owns the stores' rows (:mod:`~tpm_fed.stores.registry`), their files
under the home (:mod:`~tpm_fed.stores.snapshots`), the ingestion thread (:mod:`~tpm_fed.stores.ingestion`),
and the charges: embedding through the federation at the model's price per token (the ledger's ordinary
requests), and :data:`SEARCH_USU` per search, written to the ledger as its own settled charge (kind
``search``) in the same transaction that records it as the store's. A store's charges are the ledger's rows
for the request ids it recorded, so they add up by construction and by test.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tpm_fed.ledger import Hold, Metered
from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest, TpmError
from tpm_fed.state.schema import MICRO
from tpm_fed.stores.chunking import chunk_text, sizes_for
from tpm_fed.stores.documents import text_of
from tpm_fed.stores.embedder import Embedder, default_model, embedding_request
from tpm_fed.stores.filters import check_keys
from tpm_fed.stores.ingestion import Ingestion
from tpm_fed.stores.objects import batch_object, file_object, page, store_object
from tpm_fed.stores.protocol import BatchFile, ChunkingStrategy, SearchBody, StoreCreateBody, StoreUpdateBody
from tpm_fed.stores.registry import Caller, StoreRegistry
from tpm_fed.stores.search import Hit, search_snapshot
from tpm_fed.stores.snapshots import Snapshot, SnapshotFiles, parse_store_ref
from tpm_fed.stores.engine import StoreEngine

SEARCH_SU = float(os.environ.get("TPM_STORE_SEARCH_SU") or 0.0025)
"""Service units one search costs, beside its query's embedding (OpenAI charges $2.50 per 1,000 file
searches: at one SU to the dollar, 0.0025). The operator sets another with ``TPM_STORE_SEARCH_SU``."""

SEARCH_USU = round(SEARCH_SU * MICRO)


class Stores:
    """Args:
        runtime: The federation runtime.
        read_upload: ``(file_id, identity) -> bytes`` of an upload of ``/v1/files`` (raises NotPermitted
            for another's file, as that route does); ``filename_of`` the same upload's name.
        root: Where the stores' files live (``$TPM_HOME/stores``).
    """

    def __init__(self, runtime: StoreEngine, read_upload: Any, root: Path, filename_of: Any = None) -> None:
        self.runtime = runtime
        self.read_upload = read_upload
        self.filename_of = filename_of  # (file_id, identity) -> the upload's name (the composition root's)
        self.registry = StoreRegistry(runtime.ledger.engine)
        self.files = SnapshotFiles(root)
        self._embedders: dict[str, Embedder] = {}
        self._lock = threading.Lock()
        # The runtime has no hook for what closes with it: the thread looks (files it leaves queued resume
        # with the next service, as a stopped batch's lines do).
        self.ingestion = Ingestion(self.registry, self.files, read_upload, self.embedder,
                                   running=lambda: not getattr(runtime, "_closed", False)).start()

    def close(self) -> None:
        self.ingestion.stop()

    def embedder(self, model: str) -> Embedder:
        with self._lock:
            if model not in self._embedders:
                self._embedders[model] = Embedder(self.runtime, model)
            return self._embedders[model]

    def caller(self, identity: str, operator: bool = False) -> Caller:
        return Caller(identity, frozenset(self.runtime.projects_of(identity)), operator)

    # ----- stores ---------------------------------------------------------------------
    def create(self, caller: Caller, body: StoreCreateBody) -> dict[str, Any]:
        project = self.runtime.project_for(caller.identity, body.project)
        model = body.embedding_model or default_model(self.runtime)
        self.runtime.catalog.resolve_name(model)  # an unknown model is refused before anything is made
        chunking = body.chunking_strategy or ChunkingStrategy()
        sizes_for(chunking, self.embedder(model).counter())  # a static size over the model's context: 400 now
        store_id = self.registry.create(caller, project, body, model)
        if body.file_ids:
            try:
                self.attach(store_id, caller, [BatchFile(file_id=f, chunking_strategy=chunking) for f in body.file_ids])
            except TpmError:
                self.registry.delete(store_id, caller)  # refused whole: no store half made
                raise
        return self.get(store_id, caller)

    def get(self, store_id: str, caller: Caller) -> dict[str, Any]:
        return store_object(self.registry, self.registry.store(store_id, caller))

    def list(self, caller: Caller, after: str | None, limit: int, order: str) -> dict[str, Any]:
        rows, more = self.registry.stores_of(caller, after, limit, order)
        return page([store_object(self.registry, row) for row in rows], more)

    def update(self, store_id: str, caller: Caller, body: StoreUpdateBody) -> dict[str, Any]:
        self.registry.update(store_id, caller, body)
        return self.get(store_id, caller)

    def delete(self, store_id: str, caller: Caller) -> dict[str, Any]:
        with self.ingestion.lock(store_id):
            self.registry.delete(store_id, caller)
            self.files.remove(store_id)
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    # ----- files ------------------------------------------------------------------------
    def attach(self, store_id: str, caller: Caller, entries: list[BatchFile], *,
               batch: bool = False) -> dict[str, Any]:
        """Queue files for ingestion, quoted first: refused (429) if the store's project cannot pay for
        embedding them at their bound. Another's upload (or an unknown id) is refused (403) before any
        is queued."""
        row = self.registry.store(store_id, caller, write=True)
        default = ChunkingStrategy.model_validate_json(row.chunking_json) if row.chunking_json else ChunkingStrategy()
        counter = self.embedder(row.embedding_model).counter()
        texts: list[str] = []
        queued = []
        for entry in entries:
            data = self.read_upload(entry.file_id, caller.identity)  # theirs, or NotPermitted
            filename = self._filename(entry.file_id, caller.identity)
            chunking = entry.chunking_strategy or default
            size, overlap = sizes_for(chunking, counter)
            try:
                texts.extend(chunk.text for chunk in chunk_text(text_of(data, filename), counter, size, overlap))
            except TpmError:
                pass  # fails at ingestion, alone, with its reason; it costs nothing, so it is not quoted
            queued.append((entry.file_id, filename, entry.attributes, chunking))
        quote = self.quote_ingestion(row.embedding_model, texts, caller.identity, row.project)
        batch_id = f"vsfb_{secrets.token_hex(12)}" if batch else None
        self.registry.add_files(store_id, queued, caller.identity, row.project, batch_id)
        self.ingestion.wake()
        if batch_id is not None:
            return batch_object(self.registry, self.registry.batch(store_id, batch_id), quote)
        return {**file_object(self.registry.file(store_id, entries[0].file_id)), "tpm": {"quote": quote}}

    def quote_ingestion(self, model: str, texts: list[str], identity: str, project: str) -> dict[str, Any]:
        """The most embedding ``texts`` may cost, per site, checked against the project's balance.

        Raises:
            InsufficientBalance: The project cannot pay the bound (nothing queued, nothing charged).
        """
        per_site: dict[str, float] = defaultdict(float)
        from tpm_fed.stores.embedder import TEXTS_PER_REQUEST

        for start in range(0, len(texts), TEXTS_PER_REQUEST):
            request = embedding_request(self.runtime, model, texts[start:start + TEXTS_PER_REQUEST], project)
            try:
                quote = self.runtime.quote(request, identity)
            except InsufficientBalance as error:
                raise InsufficientBalance(f"project {project!r} cannot pay for embedding these files ({len(texts)} "
                                          f"chunks): {error}. Nothing was queued or charged.") from None
            per_site[quote.site] += quote.max_su
        available = {b.site: b.available_usu / MICRO for b in self.runtime.ledger.balances(project)}
        short = {site: need for site, need in per_site.items() if need > available.get(site, 0.0) + 1e-9}
        if short:
            raise InsufficientBalance(
                f"project {project!r} cannot pay for embedding these files at their bound: " + "; ".join(
                    f"up to {need:.6f} SU on {site}, {available.get(site, 0.0):.6f} SU available"
                    for site, need in sorted(short.items())) + ". Nothing was queued or charged.")
        return {"chunks": len(texts), "max_su": round(sum(per_site.values()), 6),
                "max_su_per_site": {site: round(value, 6) for site, value in per_site.items()}}

    def _filename(self, file_id: str, identity: str) -> str:
        return self.filename_of(file_id, identity)

    def file(self, store_id: str, file_id: str, caller: Caller) -> dict[str, Any]:
        self.registry.store(store_id, caller)
        return file_object(self.registry.file(store_id, file_id))

    def files_of(self, store_id: str, caller: Caller, status: str | None = None,
                 batch_id: str | None = None) -> dict[str, Any]:
        self.registry.store(store_id, caller)
        if batch_id is not None:
            self.registry.batch(store_id, batch_id)
        return page([file_object(entry) for entry in self.registry.files(store_id, status=status, batch_id=batch_id)],
                    False)

    def update_file(self, store_id: str, file_id: str, caller: Caller, attributes: dict[str, Any]) -> dict[str, Any]:
        """New attributes: the file is indexed again (its chunks reused), and the next snapshot has them."""
        self.registry.store(store_id, caller, write=True)
        self.registry.file(store_id, file_id)
        self.registry.update_attributes(store_id, file_id, attributes)
        self.ingestion.wake()
        return file_object(self.registry.file(store_id, file_id))

    def remove_file(self, store_id: str, file_id: str, caller: Caller) -> dict[str, Any]:
        """Take a file out: the store moves to a new snapshot without its chunks (older ones keep them)."""
        row = self.registry.store(store_id, caller, write=True)
        with self.ingestion.lock(store_id):
            self.registry.remove_file(store_id, file_id)
            snapshot = self.ingestion.rebuild(store_id, row, reason=f"removed {file_id}")
            self.registry.finish(store_id, {}, {}, snapshot)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    def file_content(self, store_id: str, file_id: str, caller: Caller) -> dict[str, Any]:
        """The file's chunks in the store's current snapshot (OpenAI's parsed content)."""
        row = self.registry.store(store_id, caller)
        self.registry.file(store_id, file_id)
        snapshot = self._snapshot(row, None)
        parts = [{"type": "text", "text": chunk.text} for chunk in (snapshot.chunks if snapshot else [])
                 if chunk.file_id == file_id]
        return {"object": "vector_store.file_content.page", "data": parts, "has_more": False, "next_page": None}

    def batch(self, store_id: str, batch_id: str, caller: Caller) -> dict[str, Any]:
        self.registry.store(store_id, caller)
        return batch_object(self.registry, self.registry.batch(store_id, batch_id))

    def cancel_batch(self, store_id: str, batch_id: str, caller: Caller) -> dict[str, Any]:
        self.registry.store(store_id, caller, write=True)
        self.registry.cancel_batch(store_id, batch_id)
        return batch_object(self.registry, self.registry.batch(store_id, batch_id))

    # ----- search -------------------------------------------------------------------------
    def search(self, ref: str, caller: Caller, body: SearchBody) -> dict[str, Any]:
        """OpenAI's search results page; ``tpm`` names the snapshot searched and the model version.

        Raises:
            NotPermitted: Not a store the caller may read; an unknown or collected snapshot.
            InvalidRequest: An expired store; a filter on an unknown attribute (nothing charged).
            ContextLengthExceeded: A query over the embedding model's context (nothing charged).
        """
        hits, snapshot, charges = self.find(ref, caller, body.query_text(), body.max_num_results, body.filters,
                                            body.ranking_options, body.project)
        return {"object": "vector_store.search_results.page", "search_query": body.query_text(),
                "data": [hit_object(hit) for hit in hits], "has_more": False, "next_page": None,
                "tpm": search_facts(snapshot, charges)}

    def find(self, ref: str, caller: Caller, query: str, limit: int, condition: Any = None, ranking: Any = None,
             project: str | None = None) -> tuple[list[Hit], Snapshot | None, dict[str, Any]]:
        """The hits of one search, the snapshot it searched, and what it was charged."""
        store_id, pinned = parse_store_ref(ref)
        row = self.registry.store(store_id, caller)
        if self.registry.expired(row):
            raise InvalidRequest(f"vector store {store_id} expired (unused for {row.expires_after_days} days)")
        snapshot = self._snapshot(row, pinned)
        if snapshot is None or not snapshot.chunks:
            return [], snapshot, {}
        if condition is not None:  # before anything is charged
            check_keys(condition, snapshot.attribute_keys())
        embedder = self.embedder(f"{snapshot.model}@{snapshot.model_version}")
        embedder.counter().check_query(query)
        payer = self.runtime.project_for(caller.identity, project)
        embedded = embedder.embed([query], caller.identity, payer,
                                  charged=lambda ids: self.registry.record_charges(store_id, "query", ids))
        hits = search_snapshot(snapshot, embedded.vectors[0], query, limit, condition, ranking)
        search_id = self._charge_search(store_id, snapshot, caller.identity, payer, embedded.site)
        self.registry.touch(store_id)
        return hits, snapshot, {"query_request_ids": list(embedded.request_ids), "query_tokens": embedded.prompt_tokens,
                                "search_request_id": search_id, "search_su": SEARCH_SU}

    def _snapshot(self, row: Any, pinned: str | None) -> Snapshot | None:
        snapshot_id = self.registry.snapshot(row.store_id, pinned).snapshot_id if pinned else row.snapshot_id
        return self.files.load(row.store_id, snapshot_id) if snapshot_id else None

    def _charge_search(self, store_id: str, snapshot: Snapshot, identity: str, project: str, site: str) -> str:
        """One search's charge: reserved and settled in one transaction (never left in doubt), with the
        store's record of it."""
        request_id = f"search-{secrets.token_hex(12)}"
        hold = Hold(request_id, project, site, identity, f"store:{store_id}"[:200], snapshot.snapshot_id, "search",
                    SEARCH_USU)
        ledger = self.runtime.ledger
        with ledger.engine.begin() as db:
            refused = ledger.reserve_many([hold], db)
            if request_id in refused:
                raise refused[request_id]
            ledger.settle_many([(request_id, Metered(), SEARCH_USU)], db)
            self.registry.record_charges(store_id, "search", [request_id], db)
        return request_id

    # ----- snapshots and collection -------------------------------------------------------------
    def snapshots(self, store_id: str, caller: Caller) -> dict[str, Any]:
        row = self.registry.store(store_id, caller)
        items = [{"id": s.snapshot_id, "object": "vector_store.snapshot", "created_at": int(s.created_at),
                  "current": s.snapshot_id == row.snapshot_id, "model": s.model, "model_version": s.model_version,
                  "index": s.index_json, "files": s.files, "chunks": s.chunks, "reason": s.reason,
                  "collected": s.collected_at is not None} for s in self.registry.snapshots(store_id)]
        return {"object": "list", "data": items, "has_more": False}

    def charges(self, store_id: str, caller: Caller) -> dict[str, Any]:
        self.registry.store(store_id, caller)
        parts = self.registry.charges(store_id)
        total = sum(part["charged_usu"] for part in parts.values())
        return {"object": "vector_store.charges", "id": store_id, "total_su": total / MICRO,
                "by_cause": {what: {**part, "charged_su": part["charged_usu"] / MICRO} for what, part in parts.items()}}

    def gc(self, caller: Caller, keep: int = 1) -> dict[str, Any]:
        """Remove the files of snapshots no store points at (each store keeps its current one and the
        ``keep - 1`` newest others), and of expired stores; an operator collects every project's stores."""
        collected: list[str] = []
        rows, _ = self.registry.stores_of(caller, None, 10_000, "desc")
        for row in rows:
            if not (caller.operator or row.project in caller.projects):
                continue
            with self.ingestion.lock(row.store_id):
                kept = 1
                for snap in self.registry.snapshots(row.store_id):
                    if snap.collected_at is not None or snap.snapshot_id == row.snapshot_id:
                        continue
                    if kept < keep:
                        kept += 1
                        continue
                    self.files.remove(row.store_id, snap.snapshot_id)
                    self.registry.mark_collected(row.store_id, snap.snapshot_id)
                    collected.append(f"{row.store_id}@{snap.snapshot_id}")
        return {"object": "vector_store.gc", "collected": collected, "at": int(time.time())}


def hit_object(hit: Hit) -> dict[str, Any]:
    return {"file_id": hit.chunk.file_id, "filename": hit.chunk.filename, "score": hit.score,
            "attributes": hit.chunk.attributes, "content": [{"type": "text", "text": hit.chunk.text}],
            "tpm": {"chunk": hit.chunk.index, "start": hit.chunk.start, "end": hit.chunk.end}}


def search_facts(snapshot: Snapshot | None, charges: dict[str, Any]) -> dict[str, Any]:
    if snapshot is None:
        return {"snapshot": None, **charges}
    return {"store": snapshot.store_id, "snapshot": snapshot.snapshot_id,
            "ref": f"{snapshot.store_id}@{snapshot.snapshot_id}", "model": snapshot.model,
            "model_version": snapshot.model_version, "index": snapshot.index_params, **charges}
