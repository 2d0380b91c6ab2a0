"""The request log and the replicas seen, in SQLite (or any SQLAlchemy URL).

Every request is written when it is accepted and again when it ends, so
``tpm status`` can show the queue and the warm replicas from another process,
and an interrupted run leaves a trace of what was in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)

from tpm_fed.request import GenerationRequest
from tpm_fed.result import GenerationResult

metadata = MetaData()

requests_table = Table(
    "requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("version", String(64)),
    Column("site", String(200)),
    Column("replica_id", String(400)),
    Column("status", String(16), nullable=False),  # queued | done | failed
    Column("prompts", Integer, nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("submitted_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("error", Text),
)

replicas_table = Table(
    "replicas",
    metadata,
    Column("replica_id", String(400), primary_key=True),
    Column("site", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(64), nullable=False),
    Column("backend", String(32), nullable=False),
    Column("state", String(16), nullable=False),  # warm | stopped
    Column("pid", Integer),
    Column("served_requests", Integer, nullable=False, default=0),
    Column("last_used", Float, nullable=False),
)


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    site: str
    model: str
    version: str
    backend: str
    state: str
    served_requests: int
    last_used: float


class RequestLog:
    """Writes and reads the request log and replica table.

    Args:
        url: SQLAlchemy database URL; tables are created if missing.
    """

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def accepted(self, request: GenerationRequest, version: str, site: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                requests_table.insert().values(
                    request_id=request.request_id,
                    model=request.model.name,
                    version=version,
                    site=site,
                    status="queued",
                    prompts=len(request.prompts),
                    submitted_at=time.time(),
                )
            )

    def finished(self, result: GenerationResult) -> None:
        now = time.time()
        with self.engine.begin() as db:
            db.execute(
                update(requests_table)
                .where(requests_table.c.request_id == result.request_id)
                .values(
                    status="done",
                    replica_id=result.replica.replica_id,
                    prompt_tokens=result.usage.prompt_tokens,
                    completion_tokens=result.usage.completion_tokens,
                    finished_at=now,
                )
            )
            # Update-then-insert rather than a dialect's upsert, so any SQL
            # database works; one writer per replica makes the race harmless.
            seen = db.execute(
                update(replicas_table)
                .where(replicas_table.c.replica_id == result.replica.replica_id)
                .values(
                    state="warm",
                    last_used=now,
                    served_requests=replicas_table.c.served_requests + 1,
                )
            )
            if seen.rowcount == 0:
                db.execute(
                    replicas_table.insert().values(
                        replica_id=result.replica.replica_id,
                        site=result.site,
                        model=result.model,
                        version=result.version,
                        backend=result.backend,
                        state="warm",
                        pid=result.replica.pid,
                        served_requests=1,
                        last_used=now,
                    )
                )

    def failed(self, request_id: str, error: BaseException) -> None:
        with self.engine.begin() as db:
            db.execute(
                update(requests_table)
                .where(requests_table.c.request_id == request_id)
                .values(status="failed", finished_at=time.time(), error=f"{type(error).__name__}: {error}")
            )

    def site_stopped(self, site: str) -> None:
        """The site's workers are gone, and their replicas with them."""
        with self.engine.begin() as db:
            db.execute(
                update(replicas_table).where(replicas_table.c.site == site).values(state="stopped")
            )
            db.execute(
                update(requests_table)
                .where(requests_table.c.site == site, requests_table.c.status == "queued")
                .values(status="failed", finished_at=time.time(), error="site stopped")
            )

    def replicas(self) -> list[ReplicaRow]:
        with self.engine.connect() as db:
            rows = db.execute(select(replicas_table).order_by(replicas_table.c.last_used.desc()))
            return [
                ReplicaRow(
                    replica_id=r.replica_id,
                    site=r.site,
                    model=r.model,
                    version=r.version,
                    backend=r.backend,
                    state=r.state,
                    served_requests=r.served_requests,
                    last_used=r.last_used,
                )
                for r in rows
            ]

    def queued(self) -> dict[str, int]:
        """Requests accepted and not yet finished, per site."""
        with self.engine.connect() as db:
            rows = db.execute(
                select(requests_table.c.site, func.count())
                .where(requests_table.c.status == "queued")
                .group_by(requests_table.c.site)
            )
            return {site: count for site, count in rows}

    def status_of(self, request_id: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(
                select(requests_table.c.status).where(requests_table.c.request_id == request_id)
            ).scalar()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets readers (tpm status) run beside a writer; NORMAL sync keeps
    # commits off fsync's critical path while staying crash-consistent.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
