"""The service's record of every result left by reference: whose it is, where, and until when.

A worker reports where it left a result; the service keeps that report with
the store its own federation file names for the site (a worker, which may be
a project's own machine, never chooses what the service reads). Reading
through the service goes by request id, so a caller cannot name another
result's chunks; the owner is the request's, checked by the route. Expired
results are evicted from their stores by the service's periodic sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from sqlalchemy import Connection, Engine, select, update

from tpm_fed.protocol.errors import ReferenceNotFound
from tpm_fed.protocol.references import TensorsReference
from tpm_fed.storage.reference_chunks import evict_chunks, get_chunks
from tpm_fed.storage.result_stores import connector_for
from tpm_fed.state.database import transaction
from tpm_fed.state.schema import references_table

logger = logging.getLogger(__name__)


class ReferenceRecords:
    """Results by reference, as the service knows them.

    Args:
        engine: The service database.
        store_of: Site name -> the result store the federation file names for it (or None).
    """

    def __init__(self, engine: Engine, store_of: Callable[[str], str | None]) -> None:
        self.engine = engine
        self._store_of = store_of

    def adopt(self, site: str, reference: TensorsReference) -> TensorsReference:
        """The reference as callers get it: naming the store the federation gives ``site``."""
        store = self._store_of(site)
        return reference if store is None else reference.model_copy(update={"store": store})

    def record(self, entries: list[tuple[str, str, TensorsReference]], db: Connection | None = None) -> None:
        """Remember ``(request_id, site, adopted reference)`` rows (in ``db``'s transaction, if given)."""
        if not entries:
            return
        rows = [{"request_id": request_id, "site": site, "reference": reference.model_dump_json(),
                 "expires_at": reference.expires_at} for request_id, site, reference in entries]
        with transaction(self.engine, db) as db:
            db.execute(references_table.insert(), rows)

    def find(self, request_id: str) -> tuple[str, TensorsReference] | None:
        with self.engine.connect() as db:
            row = db.execute(select(references_table).where(references_table.c.request_id == request_id)).first()
        return None if row is None else (row.site, TensorsReference.model_validate_json(row.reference))

    def open(self, request_id: str) -> tuple[TensorsReference, Iterator[bytes | memoryview]]:
        """The reference of ``request_id``'s result, and its stored bytes chunk by chunk (the caller
        checked who may read them).

        Raises:
            ReferenceNotFound: No result of that request was left by reference, its site's
                store is not one the service can reach, or its chunks are gone.
            ReferenceExpired: Past its retention.
        """
        found = self.find(request_id)
        if found is None:
            raise ReferenceNotFound(f"request {request_id} left no result by reference")
        site, reference = found
        if self._store_of(site) is None:
            raise ReferenceNotFound(f"site {site!r} names no result store in the federation file, so the service "
                                    f"cannot read its results; read {reference.store} where it is")
        return reference, get_chunks(connector_for(reference.store), reference)

    def evict_expired(self, now: float | None = None) -> int:
        """Drop every expired result from its store; how many were evicted."""
        now = now or time.time()
        table = references_table.c
        with self.engine.connect() as db:
            rows = db.execute(select(references_table).where(table.expires_at < now, table.evicted_at.is_(None))).all()
        evicted = 0
        for row in rows:
            reference = TensorsReference.model_validate_json(row.reference)
            if self._store_of(row.site) is not None:
                try:
                    evict_chunks(connector_for(reference.store), reference)
                except Exception:  # a store away for now: the next sweep tries again
                    logger.exception("could not evict the expired result of request %s", row.request_id)
                    continue
            with self.engine.begin() as db:
                db.execute(update(references_table).where(table.request_id == row.request_id).values(evicted_at=now))
            evicted += 1
        return evicted
