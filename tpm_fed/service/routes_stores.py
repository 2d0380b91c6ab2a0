"""OpenAI's vector-store routes, and tpm-fed's own beside them (snapshots, charges, collection).

- ``/v1/vector_stores``: create (``name``, ``file_ids``, ``chunking_strategy``, ``expires_after``, ``metadata``;
  tpm-fed's ``project`` and ``embedding_model``), list, get, update (an operator may set ``published``), delete.
- ``/v1/vector_stores/{id}/files`` (attach one file, list, get, update attributes, remove, its parsed content)
  and ``/file_batches`` (attach many, get, cancel, list its files). Files are uploads of ``/v1/files``
  (``purpose=assistants``), the caller's own.
- ``POST /v1/vector_stores/{id}/search``: ``{id}`` may pin a snapshot, ``vs_...@SNAPSHOT``.
- ``GET /tpm/v1/vector_stores/{id}/snapshots``, ``GET /tpm/v1/vector_stores/{id}/charges``,
  ``POST /tpm/v1/vector_stores/gc``.

Every route answers 403 for a store outside the caller's projects (and for one that does not exist: the
same answer), unless an operator published it (then reads and searches are open to all).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.service.auth import identity_of
from tpm_fed.stores.protocol import (
    AttributeValue,
    FileBatchBody,
    SearchBody,
    StoreCreateBody,
    StoreFileBody,
    StoreUpdateBody,
    BatchFile,
)
from tpm_fed.stores.service import Stores
from pydantic import BaseModel, ConfigDict

router = APIRouter()


class _AttributesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, AttributeValue]


def _stores(request: Request) -> Stores:
    """The service's one :class:`Stores` (built by :class:`tpm_fed.service.assembly.ServiceAssembly`)."""
    return request.app.state.stores


def _caller(request: Request, identity: str) -> Any:
    return _stores(request).caller(identity, identity in request.app.state.operators)


@router.post("/v1/vector_stores")
def create_store(body: StoreCreateBody, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).create(_caller(request, identity), body)


@router.get("/v1/vector_stores")
def list_stores(request: Request, limit: int = 20, order: Literal["asc", "desc"] = "desc", after: str | None = None,
                identity: str = Depends(identity_of)) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit: between 1 and 100")
    return _stores(request).list(_caller(request, identity), after, limit, order)


@router.get("/v1/vector_stores/{store_id}")
def get_store(store_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).get(store_id, _caller(request, identity))


@router.post("/v1/vector_stores/{store_id}")
def update_store(store_id: str, body: StoreUpdateBody, request: Request,
                 identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).update(store_id, _caller(request, identity), body)


@router.delete("/v1/vector_stores/{store_id}")
def delete_store(store_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).delete(store_id, _caller(request, identity))


@router.post("/v1/vector_stores/{store_id}/files")
def attach_file(store_id: str, body: StoreFileBody, request: Request,
                identity: str = Depends(identity_of)) -> dict[str, Any]:
    entry = BatchFile(file_id=body.file_id, attributes=body.attributes, chunking_strategy=body.chunking_strategy)
    return _stores(request).attach(store_id, _caller(request, identity), [entry])


@router.get("/v1/vector_stores/{store_id}/files")
def list_store_files(store_id: str, request: Request, filter: str | None = None,  # noqa: A002 (OpenAI's name)
                     identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).files_of(store_id, _caller(request, identity), status=filter)


@router.get("/v1/vector_stores/{store_id}/files/{file_id}")
def get_store_file(store_id: str, file_id: str, request: Request,
                   identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).file(store_id, file_id, _caller(request, identity))


@router.post("/v1/vector_stores/{store_id}/files/{file_id}")
def update_store_file(store_id: str, file_id: str, body: _AttributesBody, request: Request,
                      identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).update_file(store_id, file_id, _caller(request, identity), body.attributes)


@router.delete("/v1/vector_stores/{store_id}/files/{file_id}")
def remove_store_file(store_id: str, file_id: str, request: Request,
                      identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).remove_file(store_id, file_id, _caller(request, identity))


@router.get("/v1/vector_stores/{store_id}/files/{file_id}/content")
def store_file_content(store_id: str, file_id: str, request: Request,
                       identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).file_content(store_id, file_id, _caller(request, identity))


@router.post("/v1/vector_stores/{store_id}/file_batches")
def create_file_batch(store_id: str, body: FileBatchBody, request: Request,
                      identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).attach(store_id, _caller(request, identity), body.entries(), batch=True)


@router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}")
def get_file_batch(store_id: str, batch_id: str, request: Request,
                   identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).batch(store_id, batch_id, _caller(request, identity))


@router.post("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel")
def cancel_file_batch(store_id: str, batch_id: str, request: Request,
                      identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).cancel_batch(store_id, batch_id, _caller(request, identity))


@router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files")
def file_batch_files(store_id: str, batch_id: str, request: Request, filter: str | None = None,  # noqa: A002
                     identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).files_of(store_id, _caller(request, identity), status=filter, batch_id=batch_id)


@router.post("/v1/vector_stores/{store_ref}/search")
def search_store(store_ref: str, body: SearchBody, request: Request,
                 identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).search(store_ref, _caller(request, identity), body)


@router.get("/tpm/v1/vector_stores/{store_id}/snapshots")
def store_snapshots(store_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).snapshots(store_id, _caller(request, identity))


@router.get("/tpm/v1/vector_stores/{store_id}/charges")
def store_charges(store_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _stores(request).charges(store_id, _caller(request, identity))


class _GcBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int = 1


@router.post("/tpm/v1/vector_stores/gc")
def collect(body: _GcBody, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    if body.keep < 1:
        raise InvalidRequest("keep: at least 1 (a store's current snapshot is always kept)")
    return _stores(request).gc(_caller(request, identity), body.keep)
