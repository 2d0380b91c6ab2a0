"""Vector stores, their files, file batches and snapshots in the service's database; who may see which.

A store belongs to a project: its members may read and change it, nobody else sees it (403, the same
answer for a store that does not exist, so ids are no oracle). An operator may publish a store: then every
caller may read and search it (a center's curated corpus), and only its project's members change it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from tpm_fed.protocol.errors import InvalidRequest, NotPermitted
from tpm_fed.state.database import add_missing_columns
from tpm_fed.stores.protocol import ChunkingStrategy, StoreCreateBody, StoreUpdateBody
from tpm_fed.stores.tables import (
    store_batches_table,
    store_charges_table,
    store_files_table,
    store_metadata,
    store_snapshots_table,
    vector_stores_table,
)

DAY_S = 24 * 3600


@dataclass(frozen=True)
class Caller:
    """Who asks: their identity, their projects, and whether they operate the service."""

    identity: str
    projects: frozenset[str]
    operator: bool = False


class StoreRegistry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        store_metadata.create_all(engine)
        add_missing_columns(engine, store_metadata)

    # ----- stores -------------------------------------------------------------------
    def create(self, caller: Caller, project: str, body: StoreCreateBody, model: str) -> str:
        store_id = f"vs_{secrets.token_hex(12)}"
        now = time.time()
        with self.engine.begin() as db:
            db.execute(insert(vector_stores_table).values(
                store_id=store_id, name=body.name, description=body.description, project=project,
                owner=caller.identity, embedding_model=model,
                chunking_json=body.chunking_strategy.model_dump_json() if body.chunking_strategy else None,
                metadata_json=json.dumps(body.metadata) if body.metadata is not None else None,
                expires_after_days=body.expires_after.days if body.expires_after else None,
                published=False, snapshot_id=None, created_at=now, last_active_at=now))
        return store_id

    def store(self, store_id: str, caller: Caller, *, write: bool = False) -> Any:
        """The store's row, if ``caller`` may read it (or change it, with ``write``).

        Raises:
            NotPermitted: No such store, or not theirs to read (or change).
        """
        with self.engine.connect() as db:
            row = db.execute(select(vector_stores_table).where(vector_stores_table.c.store_id == store_id)).first()
        member = row is not None and (row.project in caller.projects or caller.operator)
        if row is None or not (member or (row.published and not write)):
            raise NotPermitted(f"no vector store {store_id!r} of your projects")
        if write and not member:
            raise NotPermitted(f"vector store {store_id!r} is published for reading; only project "
                               f"{row.project!r} changes it")
        return row

    def store_row(self, store_id: str) -> Any:
        """The store's row with no permission asked (the service's own work: ingestion, gc); None if gone."""
        with self.engine.connect() as db:
            return db.execute(select(vector_stores_table).where(vector_stores_table.c.store_id == store_id)).first()

    def stores_of(self, caller: Caller, after: str | None, limit: int, order: str) -> tuple[list[Any], bool]:
        s = vector_stores_table.c
        visible = s.project.in_(sorted(caller.projects)) | (s.published == True)  # noqa: E712 (SQL)
        query = select(vector_stores_table) if caller.operator else select(vector_stores_table).where(visible)
        with self.engine.connect() as db:
            if after is not None:
                cursor = db.execute(select(s.created_at).where(s.store_id == after)).first()
                if cursor is None:
                    raise InvalidRequest(f"after: no vector store {after!r} of yours")
                query = query.where(s.created_at < cursor.created_at if order == "desc"
                                    else s.created_at > cursor.created_at)
            ordering = s.created_at.desc() if order == "desc" else s.created_at.asc()
            rows = db.execute(query.order_by(ordering, s.store_id).limit(limit + 1)).all()
        return rows[:limit], len(rows) > limit

    def update(self, store_id: str, caller: Caller, body: StoreUpdateBody) -> None:
        self.store(store_id, caller, write=True)
        values: dict[str, Any] = {"last_active_at": time.time()}
        if body.name is not None:
            values["name"] = body.name
        if body.metadata is not None:
            values["metadata_json"] = json.dumps(body.metadata)
        if body.expires_after is not None:
            values["expires_after_days"] = body.expires_after.days
        if body.published is not None:
            if not caller.operator:
                raise NotPermitted("only an operator publishes a store (or takes it back)")
            values["published"] = body.published
        with self.engine.begin() as db:
            db.execute(update(vector_stores_table).where(vector_stores_table.c.store_id == store_id).values(**values))

    def delete(self, store_id: str, caller: Caller) -> None:
        """Forget the store and its files' rows (the caller removes its files on disk). Charges stay."""
        self.store(store_id, caller, write=True)
        with self.engine.begin() as db:
            for table in (store_files_table, store_batches_table, store_snapshots_table):
                db.execute(delete(table).where(table.c.store_id == store_id))
            db.execute(delete(vector_stores_table).where(vector_stores_table.c.store_id == store_id))

    def touch(self, store_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(update(vector_stores_table).where(vector_stores_table.c.store_id == store_id)
                       .values(last_active_at=time.time()))

    def expired(self, row: Any, now: float | None = None) -> bool:
        return row.expires_after_days is not None and \
            (now or time.time()) > row.last_active_at + row.expires_after_days * DAY_S

    def expired_stores(self) -> list[str]:
        with self.engine.connect() as db:
            rows = db.execute(select(vector_stores_table).where(
                vector_stores_table.c.expires_after_days.is_not(None))).all()
        return [row.store_id for row in rows if self.expired(row)]

    # ----- files and batches -----------------------------------------------------------
    def add_files(self, store_id: str, entries: list[tuple[str, str, dict | None, ChunkingStrategy]], added_by: str,
                  project: str, batch_id: str | None) -> None:
        """Queue files for ingestion (``(file id, filename, attributes, chunking)``); one already in the store is
        queued again (replaced: the next snapshot holds its new chunks)."""
        f = store_files_table.c
        now = time.time()
        with self.engine.begin() as db:
            if batch_id is not None:
                db.execute(insert(store_batches_table).values(batch_id=batch_id, store_id=store_id, cancelled=False,
                                                              created_at=now))
            for file_id, filename, attributes, chunking in entries:
                db.execute(delete(store_files_table).where(f.store_id == store_id, f.file_id == file_id))
                db.execute(insert(store_files_table).values(
                    store_id=store_id, file_id=file_id, filename=filename, added_by=added_by, project=project,
                    batch_id=batch_id, status="in_progress", last_error_json=None,
                    attributes_json=json.dumps(attributes or {}), chunking_json=chunking.model_dump_json(),
                    usage_bytes=0, content_sha256=None, created_at=now))

    def file(self, store_id: str, file_id: str) -> Any:
        f = store_files_table.c
        with self.engine.connect() as db:
            row = db.execute(select(store_files_table).where(f.store_id == store_id, f.file_id == file_id)).first()
        if row is None:
            raise NotPermitted(f"no file {file_id!r} in vector store {store_id!r}")
        return row

    def files(self, store_id: str, *, status: str | None = None, batch_id: str | None = None) -> list[Any]:
        f = store_files_table.c
        query = select(store_files_table).where(f.store_id == store_id)
        if status is not None:
            query = query.where(f.status == status)
        if batch_id is not None:
            query = query.where(f.batch_id == batch_id)
        with self.engine.connect() as db:
            return db.execute(query.order_by(f.created_at, f.file_id)).all()

    def update_attributes(self, store_id: str, file_id: str, attributes: dict[str, Any]) -> None:
        f = store_files_table.c
        with self.engine.begin() as db:
            db.execute(update(store_files_table).where(f.store_id == store_id, f.file_id == file_id)
                       .values(attributes_json=json.dumps(attributes), status="in_progress"))

    def remove_file(self, store_id: str, file_id: str) -> None:
        f = store_files_table.c
        with self.engine.begin() as db:
            if not db.execute(delete(store_files_table).where(f.store_id == store_id, f.file_id == file_id)).rowcount:
                raise NotPermitted(f"no file {file_id!r} in vector store {store_id!r}")

    def file_counts(self, store_id: str, batch_id: str | None = None) -> dict[str, int]:
        f = store_files_table.c
        query = select(f.status, func.count()).where(f.store_id == store_id)
        if batch_id is not None:
            query = query.where(f.batch_id == batch_id)
        with self.engine.connect() as db:
            counts = dict(db.execute(query.group_by(f.status)).all())
        counts = {state: counts.get(state, 0) for state in ("in_progress", "completed", "failed", "cancelled")}
        return {**counts, "total": sum(counts.values())}

    def batch(self, store_id: str, batch_id: str) -> Any:
        b = store_batches_table.c
        with self.engine.connect() as db:
            row = db.execute(select(store_batches_table).where(b.batch_id == batch_id, b.store_id == store_id)).first()
        if row is None:
            raise NotPermitted(f"no file batch {batch_id!r} in vector store {store_id!r}")
        return row

    def cancel_batch(self, store_id: str, batch_id: str) -> None:
        self.batch(store_id, batch_id)
        f, b = store_files_table.c, store_batches_table.c
        with self.engine.begin() as db:
            db.execute(update(store_batches_table).where(b.batch_id == batch_id).values(cancelled=True))
            db.execute(update(store_files_table).where(f.store_id == store_id, f.batch_id == batch_id,
                                                       f.status == "in_progress").values(status="cancelled"))

    def stores_with_work(self) -> list[str]:
        f = store_files_table.c
        with self.engine.connect() as db:
            return [row[0] for row in db.execute(select(f.store_id).where(f.status == "in_progress").distinct())]

    def finish(self, store_id: str, done: dict[str, tuple[int, str]], failed: dict[str, dict[str, str]],
               snapshot: dict[str, Any] | None) -> None:
        """Record one ingestion pass in one transaction: the new snapshot (made current), the files it
        holds now completed (``file id -> (bytes, sha256)``), the failed ones with their error. A file
        cancelled (or removed) meanwhile stays so."""
        f, s = store_files_table.c, vector_stores_table.c
        now = time.time()
        with self.engine.begin() as db:
            if snapshot is not None:
                known = db.execute(select(func.count()).where(
                    store_snapshots_table.c.store_id == store_id,
                    store_snapshots_table.c.snapshot_id == snapshot["snapshot_id"])).scalar_one()
                if not known:
                    db.execute(insert(store_snapshots_table).values(store_id=store_id, created_at=now,
                                                                    collected_at=None, **snapshot))
                db.execute(update(vector_stores_table).where(s.store_id == store_id)
                           .values(snapshot_id=snapshot["snapshot_id"], last_active_at=now))
            for file_id, (size, digest) in done.items():
                db.execute(update(store_files_table).where(f.store_id == store_id, f.file_id == file_id,
                                                           f.status == "in_progress")
                           .values(status="completed", usage_bytes=size, content_sha256=digest))
            for file_id, error in failed.items():
                db.execute(update(store_files_table).where(f.store_id == store_id, f.file_id == file_id,
                                                           f.status == "in_progress")
                           .values(status="failed", last_error_json=json.dumps(error)))

    # ----- snapshots -------------------------------------------------------------------
    def snapshots(self, store_id: str) -> list[Any]:
        n = store_snapshots_table.c
        with self.engine.connect() as db:
            return db.execute(select(store_snapshots_table).where(n.store_id == store_id)
                              .order_by(n.created_at.desc())).all()

    def snapshot(self, store_id: str, snapshot_id: str) -> Any:
        """A snapshot by its id or a prefix of it.

        Raises:
            NotPermitted: None of this store's snapshots has that id (or it was collected).
        """
        n = store_snapshots_table.c
        with self.engine.connect() as db:
            rows = db.execute(select(store_snapshots_table).where(
                n.store_id == store_id, n.snapshot_id.startswith(snapshot_id, autoescape=True),
                n.collected_at.is_(None))).all()
        if len(rows) != 1:
            raise NotPermitted(f"no snapshot {snapshot_id!r} of vector store {store_id!r}" if not rows else
                               f"snapshot {snapshot_id!r} of {store_id!r} is ambiguous: give more of its id")
        return rows[0]

    def mark_collected(self, store_id: str, snapshot_id: str) -> None:
        n = store_snapshots_table.c
        with self.engine.begin() as db:
            db.execute(update(store_snapshots_table).where(n.store_id == store_id, n.snapshot_id == snapshot_id)
                       .values(collected_at=time.time()))

    def all_store_ids(self) -> list[str]:
        with self.engine.connect() as db:
            return [row[0] for row in db.execute(select(vector_stores_table.c.store_id))]

    # ----- charges -----------------------------------------------------------------------
    def record_charges(self, store_id: str, what: str, request_ids: list[str] | tuple[str, ...], db: Any = None) -> None:
        if not request_ids:
            return
        rows = [{"request_id": rid, "store_id": store_id, "what": what, "created_at": time.time()}
                for rid in request_ids]
        if db is not None:
            db.execute(insert(store_charges_table), rows)
            return
        with self.engine.begin() as own:
            own.execute(insert(store_charges_table), rows)

    def charges(self, store_id: str) -> dict[str, Any]:
        """The ledger's settled charges for what the store caused, by what caused them (micro-SUs)."""
        from tpm_fed.state.schema import charges_table

        c, k = charges_table.c, store_charges_table.c
        with self.engine.connect() as db:
            rows = db.execute(select(k.what, func.count(), func.coalesce(func.sum(c.charged_usu), 0),
                                     func.coalesce(func.sum(c.prompt_tokens), 0))
                              .join(charges_table, c.request_id == k.request_id)
                              .where(k.store_id == store_id, c.state == "settled").group_by(k.what)).all()
        return {what: {"requests": count, "charged_usu": int(usu), "tokens": int(tokens)}
                for what, count, usu, tokens in rows}
