"""The request log: every request, written when its batch leaves and when it ends.

A batch at a time, in the transaction that reserves (or settles) the batch's
service units when the caller passes its connection, so ``tpm status`` can show the
queue from another process, and an interrupted run leaves a trace of what
was in flight.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update

from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult
from tpm_fed.state.database import transaction
from tpm_fed.state.schema import requests_table


class RequestLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        r = requests_table.c
        self._insert = requests_table.insert()
        self._done = (
            update(requests_table)
            .where(r.request_id == bindparam("rid"))
            .values(status="done", replica_id=bindparam("replica"), prompt_tokens=bindparam("prompt"),
                    completion_tokens=bindparam("completion"), activation_bytes=bindparam("activations"),
                    cold_start=bindparam("cold"), finished_at=bindparam("at"))
        )
        self._resent = (
            update(requests_table)
            .where(r.request_id == bindparam("rid"))
            .values(status="queued", site=bindparam("site"), version=bindparam("version"), error=None,
                    finished_at=None)
        )
        self._failed = (
            update(requests_table)
            .where(r.request_id == bindparam("rid"))
            .values(status="failed", finished_at=bindparam("at"), error=bindparam("why"))
        )

    def record_sent(
        self, site: str, version: str, requests: list[ServingRequest], db: Connection | None = None
    ) -> None:
        """Log a batch as queued (in ``db``'s transaction, if given)."""
        if not requests:
            return
        now = time.time()
        rows = [
            {"request_id": r.request_id, "model": r.model.name, "version": version, "site": site,
             "status": "queued", "prompts": r.item_count, "submitted_at": now}
            for r in requests
        ]
        with transaction(self.engine, db) as db:
            db.execute(self._insert, rows)

    def record_resent(
        self, site: str, version: str, requests: list[ServingRequest], db: Connection | None = None
    ) -> None:
        """Log requests sent a second time (their first task was lost) as queued again, at ``site``."""
        if requests:
            with transaction(self.engine, db) as db:
                db.execute(self._resent, [{"rid": r.request_id, "site": site, "version": version} for r in requests])

    def record_outcomes(
        self, outcomes: dict[str, ServedResult | BaseException], db: Connection | None = None
    ) -> None:
        """Log a batch's outcomes (in ``db``'s transaction, if given)."""
        now = time.time()
        done = [
            {"rid": r.request_id, "replica": r.replica.replica_id, "prompt": r.usage.prompt_tokens,
             "completion": r.usage.completion_tokens, "activations": r.usage.activation_bytes,
             "cold": not r.replica.warm, "at": now}
            for r in outcomes.values() if isinstance(r, ServedResult)
        ]
        failed = [
            {"rid": rid, "why": f"{type(e).__name__}: {e}", "at": now}
            for rid, e in outcomes.items() if isinstance(e, BaseException)
        ]
        if not (done or failed):
            return
        with transaction(self.engine, db) as db:
            if done:
                db.execute(self._done, done)
            if failed:
                db.execute(self._failed, failed)

    def site_stopped(self, site: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                update(requests_table)
                .where(requests_table.c.site == site, requests_table.c.status == "queued")
                .values(status="failed", finished_at=time.time(), error="site stopped")
            )

    def queued(self) -> dict[str, int]:
        """Requests sent and not yet finished, per site."""
        with self.engine.connect() as db:
            rows = db.execute(
                select(requests_table.c.site, func.count())
                .where(requests_table.c.status == "queued")
                .group_by(requests_table.c.site)
            )
            return {site: count for site, count in rows}

    def outcomes_of(self, request_ids: list[str]) -> dict[str, Any]:
        """The logged rows of these requests (status, usage), by id; ids never logged are absent."""
        if not request_ids:
            return {}
        with self.engine.connect() as db:
            rows = db.execute(select(requests_table).where(requests_table.c.request_id.in_(request_ids)))
            return {row.request_id: row for row in rows}

    def status_of(self, request_id: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(
                select(requests_table.c.status).where(requests_table.c.request_id == request_id)
            ).scalar()
