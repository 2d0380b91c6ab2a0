"""The service-unit ledger: reserve before a run, settle once after, release on failure.

Every operation is one database transaction whose conditions are checked by
the database itself, so concurrent callers (threads or processes, on SQLite
or PostgreSQL) can neither overspend nor charge a request twice:

* a reservation moves the estimate into ``reserved`` only ``WHERE granted -
  spent - reserved >= estimate``;
* settling and releasing are state transitions of the charge row
  (``reserved -> settled``, ``reserved -> released``) made by one conditional
  ``UPDATE ... WHERE state = 'reserved'``; the balance moves only for the rows
  that statement actually changed (its ``RETURNING`` rows), so a duplicated
  completion, two concurrent releases, or a release racing a settle move the
  money exactly once, also under PostgreSQL's READ COMMITTED.

The ``*_many`` forms take a whole batch in one transaction (a batch's
reservations when it leaves, its charges when it comes back), and accept the
caller's connection so the request log and the replica registry can be
written in that same transaction.

A request on its project's own (byo) site is recorded with the same usage,
at zero SUs, and touches no allocation.

Every other conditional statement checks how many rows it changed (a
missing allocation or charge row raises :class:`LedgerConflict` and rolls the
transaction back instead of moving money nowhere). A reservation carries a
deadline and the process that holds it: one still held past its deadline,
or whose holder is gone, is in doubt (:meth:`Ledger.in_doubt`), and the
sweeper (:mod:`tpm_fed.ledger.sweeper`) settles or releases it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest, TpmError
from tpm_fed.ledger.pricing import Metered
from tpm_fed.state.database import transaction
from tpm_fed.state.holders import this_process
from tpm_fed.state.schema import MICRO, allocations_table, charges_table

DEFAULT_HOLD_S = 3600.0
"""How long a reservation made without a deadline of its own may stay unsettled."""


class LedgerConflict(TpmError):
    """A ledger statement changed other rows than it must have (a missing allocation or charge row)."""


@dataclass(frozen=True)
class Balance:
    project: str
    site: str
    granted_usu: int
    spent_usu: int
    reserved_usu: int

    @property
    def available_usu(self) -> int:
        return self.granted_usu - self.spent_usu - self.reserved_usu


@dataclass(frozen=True)
class Charge:
    """One line of a usage statement."""

    request_id: str
    project: str
    site: str
    identity: str
    model: str
    version: str
    kind: str
    free: bool
    state: str
    estimate_usu: int
    charged_usu: int
    prompt_tokens: int
    completion_tokens: int
    activation_bytes: int
    cold_start: bool
    created_at: float
    note: str | None
    deadline: float | None = None
    holder: str | None = None


def format_su(usu: int) -> str:
    return f"{usu / MICRO:,.6f}"


@dataclass(frozen=True)
class Hold:
    """A reservation to make: ``estimate_usu`` for one request at one (project, site)."""

    request_id: str
    project: str
    site: str
    identity: str
    model: str
    version: str
    kind: str
    estimate_usu: int
    free: bool = False
    deadline: float | None = None
    """When the reservation falls in doubt (``time.time()``); None: the ledger's ``hold_s`` from now."""


class Ledger:
    """Allocations and charges in the federation's database.

    Args:
        hold_s: How long a reservation with no deadline of its own stays unsettled before it is in doubt.
        holder: The process the reservations made here belong to (``host:pid``).
    """

    def __init__(self, engine: Engine, *, hold_s: float = DEFAULT_HOLD_S, holder: str | None = None) -> None:
        self.engine = engine
        self.hold_s = hold_s
        self.holder = holder or this_process()
        self._sane_many = engine.dialect.supports_sane_multi_rowcount
        # On every batch's path: build the statements once.
        a, c = allocations_table.c, charges_table.c
        self._hold = (
            update(allocations_table)
            .where(a.project == bindparam("p"), a.site == bindparam("s"),
                   a.granted_usu - a.spent_usu - a.reserved_usu >= bindparam("amount"))
            .values(reserved_usu=a.reserved_usu + bindparam("amount"))
        )
        self._open_charges = insert(charges_table)
        self._known = select(c.request_id).where(c.request_id.in_(bindparam("ids", expanding=True)))
        self._returning = engine.dialect.update_returning
        # One conditional transition for the whole batch; RETURNING names the rows it changed.
        self._claim = (
            update(charges_table)
            .where(c.request_id.in_(bindparam("ids", expanding=True)), c.state == "reserved")
            .values(state=bindparam("state"), settled_at=bindparam("at"))
        )
        if self._returning:
            self._claim = self._claim.returning(c.request_id, c.project, c.site, c.free, c.estimate_usu)
        self._claim_one = (
            update(charges_table)
            .where(c.request_id == bindparam("rid"), c.state == "reserved")
            .values(state=bindparam("state"), settled_at=bindparam("at"))
        )
        if self._returning:  # one request (the common single call): no expanding IN to render
            self._claim_one_returning = self._claim_one.returning(
                c.request_id, c.project, c.site, c.free, c.estimate_usu)
        self._find = select(c.request_id, c.project, c.site, c.free, c.estimate_usu).where(
            c.request_id.in_(bindparam("ids", expanding=True)))
        self._usage = (
            update(charges_table)
            .where(c.request_id == bindparam("rid"))
            .values(charged_usu=bindparam("charged"), prompt_tokens=bindparam("prompt"),
                    completion_tokens=bindparam("completion"), activation_bytes=bindparam("activations"),
                    cold_start=bindparam("cold"), note=bindparam("note"))
        )
        self._note = update(charges_table).where(c.request_id == bindparam("rid")).values(note=bindparam("note"))
        self._spend = (
            update(allocations_table)
            .where(a.project == bindparam("p"), a.site == bindparam("s"))
            .values(spent_usu=a.spent_usu + bindparam("charged"),
                    reserved_usu=a.reserved_usu - bindparam("estimate"))
        )

    def sync_grants(self, grants: dict[tuple[str, str], float]) -> None:
        """Set each (project, site)'s granted SUs to what the federation file says."""
        with self.engine.begin() as db:
            for (project, site), amount in grants.items():
                granted = round(amount * MICRO)
                changed = db.execute(
                    update(allocations_table)
                    .where(allocations_table.c.project == project, allocations_table.c.site == site)
                    .values(granted_usu=granted)
                )
                if changed.rowcount == 0:
                    db.execute(insert(allocations_table).values(
                        project=project, site=site, granted_usu=granted, spent_usu=0, reserved_usu=0))

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

    def settle(self, request_id: str, used: Metered, cost_usu: int) -> int:
        """Charge what the request used (at most its estimate); once only.

        Returns:
            Micro-SUs charged by this call (0 when it was already settled or released).
        """
        return self.settle_many([(request_id, used, cost_usu)])[request_id]

    def settle_many(self, entries: list[tuple[str, Metered, int]], db: Connection | None = None) -> dict[str, int]:
        """:meth:`settle` for a batch of requests, in one transaction (``db``'s, if given)."""
        charged = dict.fromkeys((request_id for request_id, _, _ in entries), 0)
        if not entries:
            return charged
        with transaction(self.engine, db) as db:
            claimed = self._transition(db, list(charged), "settled")
            usage, spend = [], {}
            for request_id, used, cost in entries:
                charge = claimed.pop(request_id, None)
                if charge is None:
                    continue
                amount = 0 if charge.free else min(cost, charge.estimate_usu)
                capped = not charge.free and cost > charge.estimate_usu
                usage.append({
                    "rid": request_id, "charged": amount, "prompt": used.prompt_tokens,
                    "completion": used.completion_tokens, "activations": used.activation_bytes,
                    "cold": used.cold_start,
                    "note": f"capped at the estimate; priced at {format_su(cost)}" if capped else None,
                })
                if not charge.free:
                    total = spend.setdefault((charge.project, charge.site), [0, 0])
                    total[0] += amount
                    total[1] += charge.estimate_usu
                charged[request_id] = amount
            if usage:
                self._expect(db.execute(self._usage, usage), len(usage), "charges to settle")
            self._move(db, spend)
        return charged

    def release(self, request_id: str, reason: str) -> bool:
        """Give a failed request's reservation back; once only. True if released now."""
        return self.release_many([(request_id, reason)])[request_id]

    def release_many(self, entries: list[tuple[str, str]], db: Connection | None = None) -> dict[str, bool]:
        """:meth:`release` for a batch of requests, in one transaction (``db``'s, if given)."""
        released = dict.fromkeys((request_id for request_id, _ in entries), False)
        if not entries:
            return released
        with transaction(self.engine, db) as db:
            claimed = self._transition(db, list(released), "released")
            notes, spend = [], {}
            for request_id, reason in entries:
                charge = claimed.pop(request_id, None)
                if charge is None:
                    continue
                notes.append({"rid": request_id, "note": reason[:500]})
                if not charge.free:
                    spend.setdefault((charge.project, charge.site), [0, 0])[1] += charge.estimate_usu
                released[request_id] = True
            if notes:
                self._expect(db.execute(self._note, notes), len(notes), "charges to release")
            self._move(db, spend)
        return released

    def _transition(self, db: Connection, request_ids: list[str], state: str) -> dict:
        """Move the charges still ``reserved`` to ``state``; the rows this call changed, by id.

        The condition is checked by the ``UPDATE`` itself: a row another
        transaction moved first (even one committed while this one waited for
        its lock) is not changed here, and not returned.
        """
        now = time.time()
        if self._returning:
            if len(request_ids) == 1:
                rows = db.execute(self._claim_one_returning, {"rid": request_ids[0], "state": state, "at": now})
            else:
                rows = db.execute(self._claim, {"ids": request_ids, "state": state, "at": now})
            return {row.request_id: row for row in rows}
        # Without UPDATE ... RETURNING: one conditional UPDATE per row, its rowcount says who moved it.
        rows = {row.request_id: row for row in db.execute(self._find, {"ids": request_ids})}
        return {
            request_id: row for request_id, row in rows.items()
            if db.execute(self._claim_one, {"rid": request_id, "state": state, "at": now}).rowcount == 1
        }

    def _move(self, db: Connection, spend: dict[tuple[str, str], list[int]]) -> None:
        """Per (project, site): ``spent += charged``, ``reserved -= estimates`` (in a fixed order)."""
        if spend:
            self._expect(db.execute(self._spend, [
                {"p": project, "s": site, "charged": charged, "estimate": estimate}
                for (project, site), (charged, estimate) in sorted(spend.items())
            ]), len(spend), "allocations")

    def _expect(self, result, rows: int, what: str) -> None:
        """Raise (rolling the transaction back) unless a statement changed exactly ``rows`` rows.

        A driver that cannot count the rows of an executemany (no sane multi
        rowcount) is trusted for those; single statements are always checked.
        """
        if rows > 1 and not self._sane_many:
            return
        if result.rowcount != rows:
            raise LedgerConflict(f"expected to change {rows} {what}, changed {result.rowcount}")

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

    @staticmethod
    def _charge(r) -> Charge:
        return Charge(
            r.request_id, r.project, r.site, r.identity, r.model, r.version, r.kind, r.free, r.state,
            r.estimate_usu, r.charged_usu, r.prompt_tokens, r.completion_tokens, r.activation_bytes,
            r.cold_start, r.created_at, r.note, r.deadline, r.holder,
        )

    def balances(self, project: str | None = None) -> list[Balance]:
        query = select(allocations_table).order_by(allocations_table.c.project, allocations_table.c.site)
        if project is not None:
            query = query.where(allocations_table.c.project == project)
        with self.engine.connect() as db:
            return [Balance(r.project, r.site, r.granted_usu, r.spent_usu, r.reserved_usu) for r in db.execute(query)]

    @staticmethod
    def _available(db, project: str, site: str) -> int:
        row = db.execute(
            select(allocations_table).where(and_(allocations_table.c.project == project, allocations_table.c.site == site))
        ).one_or_none()
        return 0 if row is None else row.granted_usu - row.spent_usu - row.reserved_usu

    def statement(self, project: str | None = None, since: float | None = None) -> list[Charge]:
        query = select(charges_table).order_by(charges_table.c.created_at)
        if project is not None:
            query = query.where(charges_table.c.project == project)
        if since is not None:
            query = query.where(charges_table.c.created_at >= since)
        with self.engine.connect() as db:
            return [self._charge(r) for r in db.execute(query)]
