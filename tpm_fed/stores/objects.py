"""Rows as OpenAI's objects (``vector_store``, ``vector_store.file``, ``vector_store.files_batch``), with
tpm-fed's facts in a ``tpm`` object beside OpenAI's fields."""

from __future__ import annotations

import json
from typing import Any

from tpm_fed.stores.protocol import ChunkingStrategy
from tpm_fed.stores.registry import DAY_S, StoreRegistry


def store_object(registry: StoreRegistry, row: Any) -> dict[str, Any]:
    counts = registry.file_counts(row.store_id)
    expired = registry.expired(row)
    usage = sum(entry.usage_bytes for entry in registry.files(row.store_id, status="completed"))
    expires_at = int(row.last_active_at + row.expires_after_days * DAY_S) if row.expires_after_days else None
    return {
        "id": row.store_id,
        "object": "vector_store",
        "created_at": int(row.created_at),
        "name": row.name,
        "description": row.description,
        "usage_bytes": usage,
        "file_counts": counts,
        "status": "expired" if expired else "in_progress" if counts["in_progress"] else "completed",
        "expires_after": {"anchor": "last_active_at", "days": row.expires_after_days}
        if row.expires_after_days else None,
        "expires_at": expires_at,
        "last_active_at": int(row.last_active_at),
        "metadata": json.loads(row.metadata_json) if row.metadata_json else {},
        "tpm": {"project": row.project, "embedding_model": row.embedding_model, "snapshot": row.snapshot_id,
                "published": bool(row.published)},
    }


def file_object(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.file_id,
        "object": "vector_store.file",
        "created_at": int(entry.created_at),
        "vector_store_id": entry.store_id,
        "status": entry.status,
        "usage_bytes": entry.usage_bytes,
        "last_error": json.loads(entry.last_error_json) if entry.last_error_json else None,
        "attributes": json.loads(entry.attributes_json or "{}"),
        "chunking_strategy": ChunkingStrategy.model_validate_json(entry.chunking_json).wire(),
        "tpm": {"filename": entry.filename},
    }


def batch_object(registry: StoreRegistry, row: Any, quote: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = registry.file_counts(row.store_id, row.batch_id)
    if row.cancelled:
        status = "cancelled"
    elif counts["in_progress"]:
        status = "in_progress"
    elif counts["failed"] and not counts["completed"]:
        status = "failed"
    else:
        status = "completed"
    return {"id": row.batch_id, "object": "vector_store.files_batch", "created_at": int(row.created_at),
            "vector_store_id": row.store_id, "status": status, "file_counts": counts,
            **({"tpm": {"quote": quote}} if quote is not None else {})}


def page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}
