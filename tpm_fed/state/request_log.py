"""The request log and the replicas seen, in SQLite (or any SQLAlchemy URL).

Every request is written when its batch leaves for a site and again when it
ends (a batch at a time, one transaction each), so ``tpm status`` can show
the queue and the warm replicas from another process, and an interrupted run
leaves a trace of what was in flight.
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
    bindparam,
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

    def record_sent(self, site: str, version: str, requests: list[GenerationRequest]) -> None:
        """A batch of requests left for ``site``: log them as queued, in one transaction."""
        now = time.time()
        with self.engine.begin() as db:
            db.execute(
                requests_table.insert(),
                [
                    {
                        "request_id": r.request_id,
                        "model": r.model.name,
                        "version": version,
                        "site": site,
                        "status": "queued",
                        "prompts": len(r.prompts),
                        "submitted_at": now,
                    }
                    for r in requests
                ],
            )

    def record_outcomes(self, outcomes: dict[str, GenerationResult | BaseException]) -> None:
        """Close a batch of requests, and note their replica warm, in one transaction."""
        now = time.time()
        done = [r for r in outcomes.values() if isinstance(r, GenerationResult)]
        failed = {rid: e for rid, e in outcomes.items() if isinstance(e, BaseException)}
        with self.engine.begin() as db:
            if done:
                db.execute(
                    update(requests_table)
                    .where(requests_table.c.request_id == bindparam("rid"))
                    .values(
                        status="done",
                        replica_id=bindparam("replica"),
                        prompt_tokens=bindparam("prompt"),
                        completion_tokens=bindparam("completion"),
                        finished_at=now,
                    ),
                    [
                        {
                            "rid": r.request_id,
                            "replica": r.replica.replica_id,
                            "prompt": r.usage.prompt_tokens,
                            "completion": r.usage.completion_tokens,
                        }
                        for r in done
                    ],
                )
            if failed:
                db.execute(
                    update(requests_table)
                    .where(requests_table.c.request_id == bindparam("rid"))
                    .values(status="failed", finished_at=now, error=bindparam("why")),
                    [{"rid": rid, "why": f"{type(e).__name__}: {e}"} for rid, e in failed.items()],
                )
            for results in _by_replica(done).values():
                self._note_warm(db, results, now)

    @staticmethod
    def _note_warm(db, results: list[GenerationResult], now: float) -> None:
        # Update-then-insert rather than a dialect's upsert, so any SQL
        # database works; one writer per replica makes the race harmless.
        first = results[0]
        seen = db.execute(
            update(replicas_table)
            .where(replicas_table.c.replica_id == first.replica.replica_id)
            .values(
                state="warm",
                last_used=now,
                served_requests=replicas_table.c.served_requests + len(results),
            )
        )
        if seen.rowcount == 0:
            db.execute(
                replicas_table.insert().values(
                    replica_id=first.replica.replica_id,
                    site=first.site,
                    model=first.model,
                    version=first.version,
                    backend=first.backend,
                    state="warm",
                    pid=first.replica.pid,
                    served_requests=len(results),
                    last_used=now,
                )
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


def _by_replica(results: list[GenerationResult]) -> dict[str, list[GenerationResult]]:
    grouped: dict[str, list[GenerationResult]] = {}
    for result in results:
        grouped.setdefault(result.replica.replica_id, []).append(result)
    return grouped


def _sqlite_pragmas(connection, _record) -> None:
    # WAL lets readers (tpm status) run beside a writer; NORMAL sync keeps
    # commits off fsync's critical path while staying crash-consistent.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
