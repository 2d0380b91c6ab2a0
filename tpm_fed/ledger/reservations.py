"""Reserving before a run: a batch's holds in one transaction, each held or refused on its own; a
reservation moved to another site; the reservations in doubt (past their deadline, or their holder gone)."""

from __future__ import annotations

import time
from collections import Counter

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import IntegrityError

from tpm_fed.ledger.records import Charge, Hold, LedgerConflict, format_su
from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest, TpmError
from tpm_fed.state.schema import allocations_table, charges_table


class LedgerReservations:
    """The reservations part of :class:`~tpm_fed.ledger.ledger.Ledger`."""

    engine: Engine
    hold_s: float
    holder: str

    def reserve(
        self,
        request_id: str,
        *,
        project: str,
        site: str,
        identity: str,
        model: str,
        version: str,
        kind: str,
        estimate_usu: int,
        free: bool = False,
    ) -> None:
        """Hold ``estimate_usu`` for a request about to run.

        Raises:
            InsufficientBalance: The project's allocation at ``site`` cannot cover it.
            InvalidRequest: The request id already has a charge.
        """
        hold = Hold(request_id, project, site, identity, model, version, kind, estimate_usu, free)
        refused = self.reserve_many([hold])
        if request_id in refused:
            raise refused[request_id]

    def reserve_many(
        self, holds: list[Hold], db: Connection | None = None, *, look_first: bool = False
    ) -> dict[str, TpmError]:
        """Reserve for a batch of requests in one transaction; each is held or refused on its own.

        Args:
            db: Run inside this transaction (its caller commits) instead of a new one.
            look_first: Look up ids already charged before inserting. Without it (the
                fast path: ids are fresh UUIDs) an id already charged makes the insert
                raise ``IntegrityError``; in its own transaction this method then tries
                again looking first, and a caller that passed ``db`` rolls back and calls
                again with ``look_first=True``.

        Returns:
            The refused requests, with why: :class:`InsufficientBalance` (the
            allocation cannot cover it) or :class:`InvalidRequest` (the id has a charge).
        """
        if not holds:
            return {}
        if db is not None:
            return self._reserve_many(db, holds, look_first)
        try:
            with self.engine.begin() as db:
                return self._reserve_many(db, holds, look_first)
        except IntegrityError:
            with self.engine.begin() as db:
                return self._reserve_many(db, holds, look_first=True)

    def _reserve_many(self, db: Connection, holds: list[Hold], look_first: bool) -> dict[str, TpmError]:
        refused: dict[str, TpmError] = {}
        ids = Counter(h.request_id for h in holds)
        if look_first:
            for request_id in set(db.scalars(self._known, {"ids": list(ids)})):
                refused[request_id] = InvalidRequest(f"request {request_id} was already charged")
        for request_id, count in ids.items():
            if count > 1:
                refused[request_id] = InvalidRequest(f"request {request_id} appears {count} times in one batch")
        accepted = [h for h in holds if h.request_id not in refused]
        # One conditional statement per (project, site) when the whole group fits
        # (the usual case); request by request, in order, when it does not.
        groups: dict[tuple[str, str], list[Hold]] = {}
        for hold in accepted:
            if not hold.free:
                groups.setdefault((hold.project, hold.site), []).append(hold)
        for (project, site), group in sorted(groups.items()):
            total = sum(h.estimate_usu for h in group)
            if len(group) > 1 and db.execute(self._hold, {"p": project, "s": site, "amount": total}).rowcount:
                continue
            for hold in group:
                if db.execute(self._hold, {"p": project, "s": site, "amount": hold.estimate_usu}).rowcount == 0:
                    refused[hold.request_id] = InsufficientBalance(
                        f"project {project!r} has {format_su(self._available(db, project, site))} SUs "
                        f"available at site {site!r}; this request may cost up to {format_su(hold.estimate_usu)}"
                    )
        now = time.time()
        rows = [
            dict(request_id=h.request_id, project=h.project, site=h.site, identity=h.identity, model=h.model,
                 version=h.version, kind=h.kind, free=h.free, state="reserved",
                 estimate_usu=0 if h.free else h.estimate_usu, charged_usu=0, created_at=now,
                 deadline=h.deadline if h.deadline is not None else now + self.hold_s, holder=self.holder)
            for h in accepted if h.request_id not in refused
        ]
        if rows:
            db.execute(self._open_charges, rows)
        return refused

    def move_reservation(self, request_id: str, from_site: str, to_site: str, estimate_usu: int,
                         free: bool) -> None:
        """Move a reservation still held at ``from_site`` to ``to_site`` (a request placed again there).

        One transaction: the charge row moves (only while ``reserved`` at
        ``from_site``), the new site's allocation holds ``estimate_usu`` (only
        if it covers it), the old one gives its estimate back.

        Raises:
            InsufficientBalance: ``to_site``'s allocation cannot cover the estimate (nothing moved).
            LedgerConflict: The reservation is no longer held at ``from_site`` (settled, released, moved).
        """
        c, a = charges_table.c, allocations_table.c
        with self.engine.begin() as db:
            row = db.execute(select(c.project, c.estimate_usu, c.free)
                             .where(c.request_id == request_id, c.state == "reserved", c.site == from_site)).one_or_none()
            if row is None:
                raise LedgerConflict(f"request {request_id} holds no reservation at site {from_site!r}")
            moved = db.execute(
                update(charges_table)
                .where(c.request_id == request_id, c.state == "reserved", c.site == from_site,
                       c.estimate_usu == row.estimate_usu)
                .values(site=to_site, estimate_usu=0 if free else estimate_usu, free=free))
            self._expect(moved, 1, "reservations to move")
            if not free and db.execute(self._hold, {"p": row.project, "s": to_site, "amount": estimate_usu}
                                       ).rowcount == 0:
                raise InsufficientBalance(
                    f"project {row.project!r} has {format_su(self._available(db, row.project, to_site))} SUs "
                    f"available at site {to_site!r}; this request may cost up to {format_su(estimate_usu)}")
            if not row.free:
                self._move(db, {(row.project, from_site): [0, row.estimate_usu]})

    def in_doubt(self, now: float | None = None) -> list[Charge]:
        """Reservations still held past their deadline, or held by a process of this machine that is gone."""
        from tpm_fed.state.holders import process_alive

        now = time.time() if now is None else now
        c = charges_table.c
        query = select(charges_table).where(c.state == "reserved").order_by(c.created_at)
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [
            self._charge(r) for r in rows
            if (r.deadline if r.deadline is not None else r.created_at + self.hold_s) < now
            or not process_alive(r.holder)
        ]
