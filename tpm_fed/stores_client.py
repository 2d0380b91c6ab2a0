"""The vector-store side of the Python API: ``Client().stores`` makes stores, adds files, searches, and
``Client().ask`` answers a question with a store's knowledge (cited).

The same routes the ``openai`` client's ``vector_stores`` and ``responses`` use, through the
:class:`~tpm_fed.client.Client`'s pooled connection; refusals raise the service's typed errors. A store is
named by its id (``vs_...``) or by its name when that names one store you can see; either may pin a
snapshot (``NAME@SNAPSHOT``), as every search result names the snapshot it used.

Example:
    >>> with Client() as client:
    ...     store = client.stores.create("papers", ["notes.md", "results.txt"])   # waits for ingestion
    ...     hits = client.stores.search("papers", "Where does the silt go?")
    ...     print(hits["tpm"]["ref"], [hit["filename"] for hit in hits["data"]])
    ...     answer = client.ask("Where does the silt go?", store="papers")
    ...     print(answer["text"], answer["citations"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tpm_fed.protocol.errors import InvalidRequest, NotPermitted


class _Caller(Protocol):
    def _call(self, method: str, path: str, **options: Any) -> Any: ...


class VectorStores:
    """The vector-store routes, through a :class:`~tpm_fed.client.Client`."""

    def __init__(self, client: _Caller) -> None:
        self._client = client

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a document (text, Markdown, JSONL, PDF) for stores; checked by the service as it arrives."""
        path = Path(path)
        return self._client._call("POST", "/v1/files", files={"file": (path.name, path.read_bytes())},
                                  data={"purpose": "assistants"})

    def create(self, name: str, files: list[str | Path] = (), *, project: str | None = None,
               model: str | None = None, chunk_tokens: int | None = None, overlap_tokens: int | None = None,
               wait: bool = True, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Make a store of ``files`` (paths, uploaded first); with ``wait``, return once they are ingested."""
        body: dict[str, Any] = {"name": name, "file_ids": [self.upload(path)["id"] for path in files]}
        if project:
            body["project"] = project
        if model:
            body["embedding_model"] = model
        if chunk_tokens is not None:
            body["chunking_strategy"] = {"type": "static", "static": {
                "max_chunk_size_tokens": chunk_tokens,
                "chunk_overlap_tokens": overlap_tokens if overlap_tokens is not None else chunk_tokens // 2}}
        store = self._client._call("POST", "/v1/vector_stores", json=body)
        return self.wait(store["id"], progress) if wait else store

    def add(self, store: str, files: list[str | Path], *, attributes: dict[str, Any] | None = None,
            wait: bool = True, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Add files (as one file batch, quoted first): the store moves to a new snapshot with them."""
        store_id = self.resolve(store)
        ids = [self.upload(path)["id"] for path in files]
        self._client._call("POST", f"/v1/vector_stores/{store_id}/file_batches",
                           json={"file_ids": ids, **({"attributes": attributes} if attributes else {})})
        return self.wait(store_id, progress) if wait else self.get(store_id)

    def wait(self, store: str, progress: Callable[[dict[str, Any]], None] | None = None,
             timeout_s: float = 3600) -> dict[str, Any]:
        """The store once no file is in progress (``progress(store)`` after each look)."""
        store_id = self.resolve(store)
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.get(store_id)
            if progress is not None:
                progress(found)
            if found["status"] != "in_progress" or time.monotonic() > deadline:
                return found
            time.sleep(0.25)

    def list(self) -> list[dict[str, Any]]:
        stores, after = [], None
        while True:
            page = self._client._call("GET", "/v1/vector_stores", params={"limit": 100, **({"after": after} if after
                                                                                        else {})})
            stores += page["data"]
            if not page["has_more"]:
                return stores
            after = page["last_id"]

    def get(self, store: str) -> dict[str, Any]:
        return self._client._call("GET", f"/v1/vector_stores/{self.resolve(store)}")

    def files(self, store: str) -> list[dict[str, Any]]:
        return self._client._call("GET", f"/v1/vector_stores/{self.resolve(store)}/files")["data"]

    def search(self, store: str, query: str, *, max_results: int = 10, filters: dict[str, Any] | None = None,
               project: str | None = None) -> dict[str, Any]:
        """OpenAI's search results page; ``["tpm"]["ref"]`` is ``store@snapshot``, to search it again as it was."""
        body = {"query": query, "max_num_results": max_results, **({"filters": filters} if filters else {}),
                **({"project": project} if project else {})}
        return self._client._call("POST", f"/v1/vector_stores/{self.resolve(store, pinned=True)}/search", json=body)

    def remove(self, store: str) -> dict[str, Any]:
        """Delete a store (its snapshots too; the charges it made stay in the ledger)."""
        return self._client._call("DELETE", f"/v1/vector_stores/{self.resolve(store)}")

    def snapshots(self, store: str) -> list[dict[str, Any]]:
        return self._client._call("GET", f"/tpm/v1/vector_stores/{self.resolve(store)}/snapshots")["data"]

    def charges(self, store: str) -> dict[str, Any]:
        return self._client._call("GET", f"/tpm/v1/vector_stores/{self.resolve(store)}/charges")

    def gc(self, keep: int = 1) -> dict[str, Any]:
        """Remove the files of old snapshots of your projects' stores (each keeps its current one and the
        ``keep - 1`` newest others); a collected snapshot can no longer be pinned."""
        return self._client._call("POST", "/tpm/v1/vector_stores/gc", json={"keep": keep})

    def resolve(self, store: str, *, pinned: bool = False) -> str:
        """A store's id from its id or name (``@SNAPSHOT`` kept when ``pinned``).

        Raises:
            NotPermitted: No store you can see has that name.
            InvalidRequest: Several do (name it by id), or a snapshot where none may be pinned.
        """
        name, at, snapshot = store.partition("@")
        if at and not pinned:
            raise InvalidRequest(f"{store!r}: a snapshot can be pinned for a search, not here")
        if name.startswith("vs_"):
            return store if pinned else name
        matches = [found["id"] for found in self.list() if found["name"] == name]
        if not matches:
            raise NotPermitted(f"no vector store named {name!r} that you can see")
        if len(matches) > 1:
            raise InvalidRequest(f"{len(matches)} stores are named {name!r} ({', '.join(matches)}); give an id")
        return f"{matches[0]}{at}{snapshot}"


def ask(client: Any, question: str, store: str | list[str] | None, model: str | None = None, *,
        max_tokens: int = 64, max_results: int = 5, project: str | None = None) -> dict[str, Any]:
    """Answer ``question`` with ``model``, given the best chunks of ``store`` (``/v1/responses`` with the
    ``file_search`` tool); ``text``, ``citations`` (file id, filename, chunk, snapshot), ``prompt``, and the
    whole ``response``."""
    stores = [store] if isinstance(store, str) else list(store or [])
    tools = [{"type": "file_search", "max_num_results": max_results,
              "vector_store_ids": [client.stores.resolve(name, pinned=True) for name in stores]}] if stores else []
    body = {"model": model or client.default_model().name, "input": question, "max_output_tokens": max_tokens,
            "tools": tools, **({"project": project} if project else {})}
    response = client._call("POST", "/v1/responses", json=body)
    message = next(item for item in response["output"] if item["type"] == "message")
    part = message["content"][0]
    citations = [{"file_id": a["file_id"], "filename": a["filename"], **a.get("tpm", {})} for a in part["annotations"]]
    return {"text": part["text"], "citations": citations, "prompt": response["tpm"]["prompt"],
            "snapshots": [search.get("ref") for search in response["tpm"]["searches"]], "response": response}
