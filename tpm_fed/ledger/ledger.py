"""The service-unit ledger: reserve before a run, settle once after, release on failure.

Every operation is one database transaction whose conditions are checked by
the database itself, so concurrent callers (threads or processes, on SQLite
or PostgreSQL) can neither overspend nor charge a request twice:

* ``reserve`` moves the estimate into ``reserved`` only ``WHERE granted -
  spent - reserved >= estimate``;
* ``settle`` and ``release`` act only on a charge still ``reserved``: a
  retried or duplicated completion finds it settled and changes nothing.

A request on its project's own (byo) site is recorded with the same usage,
at zero SUs, and touches no allocation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest
from tpm_fed.ledger.pricing import Metered
from tpm_fed.state.schema import MICRO, allocations_table, charges_table


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


def format_su(usu: int) -> str:
    return f"{usu / MICRO:,.6f}"


class Ledger:
    """Allocations and charges in the federation's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Reserving is on every request's path: build its statements once.
        a = allocations_table.c
        self._hold = (
            update(allocations_table)
            .where(a.project == bindparam("p"), a.site == bindparam("s"),
                   a.granted_usu - a.spent_usu - a.reserved_usu >= bindparam("amount"))
            .values(reserved_usu=a.reserved_usu + bindparam("amount"))
        )
        self._open_charge = insert(charges_table)
        c = charges_table.c
        self._find_charge = select(charges_table).where(c.request_id == bindparam("rid"))
        self._close_charge = (
            update(charges_table)
            .where(c.request_id == bindparam("rid"), c.state == "reserved")
            .values(state=bindparam("state"), charged_usu=bindparam("charged"), settled_at=bindparam("at"),
                    prompt_tokens=bindparam("prompt"), completion_tokens=bindparam("completion"),
                    activation_bytes=bindparam("activations"), cold_start=bindparam("cold"), note=bindparam("note"))
        )
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
        row = dict(
            request_id=request_id, project=project, site=site, identity=identity, model=model,
            version=version, kind=kind, free=free, state="reserved",
            estimate_usu=0 if free else estimate_usu, charged_usu=0, created_at=time.time(),
        )
        try:
            with self.engine.begin() as db:
                if not free:
                    held = db.execute(self._hold, {"p": project, "s": site, "amount": estimate_usu})
                    if held.rowcount == 0:
                        raise InsufficientBalance(
                            f"project {project!r} has {format_su(self._available(db, project, site))} SUs "
                            f"available at site {site!r}; this request may cost up to {format_su(estimate_usu)}"
                        )
                db.execute(self._open_charge, row)
        except IntegrityError:
            raise InvalidRequest(f"request {request_id} was already charged") from None

    def settle(self, request_id: str, used: Metered, cost_usu: int) -> int:
        """Charge what the request used (at most its estimate); once only.

        Returns:
            Micro-SUs charged by this call (0 when it was already settled or released).
        """
        return self.settle_many([(request_id, used, cost_usu)])[request_id]

    def settle_many(self, entries: list[tuple[str, Metered, int]]) -> dict[str, int]:
        """:meth:`settle` for a batch of requests, in one transaction."""
        with self.engine.begin() as db:
            return {request_id: self._settle(db, request_id, used, cost) for request_id, used, cost in entries}

    def _settle(self, db, request_id: str, used: Metered, cost_usu: int) -> int:
        charge = db.execute(self._find_charge, {"rid": request_id}).one_or_none()
        if charge is None or charge.state != "reserved":
            return 0
        charged = 0 if charge.free else min(cost_usu, charge.estimate_usu)
        capped = not charge.free and cost_usu > charge.estimate_usu
        closed = db.execute(self._close_charge, {
            "rid": request_id, "state": "settled", "charged": charged, "at": time.time(),
            "prompt": used.prompt_tokens, "completion": used.completion_tokens,
            "activations": used.activation_bytes, "cold": used.cold_start,
            "note": f"capped at the estimate; priced at {format_su(cost_usu)}" if capped else None,
        })
        if closed.rowcount == 0 or charge.free:
            return 0
        db.execute(self._spend, {"p": charge.project, "s": charge.site, "charged": charged,
                                 "estimate": charge.estimate_usu})
        return charged

    def release(self, request_id: str, reason: str) -> bool:
        """Give a failed request's reservation back; once only. True if released now."""
        return self.release_many([(request_id, reason)])[request_id]

    def release_many(self, entries: list[tuple[str, str]]) -> dict[str, bool]:
        """:meth:`release` for a batch of requests, in one transaction."""
        with self.engine.begin() as db:
            return {request_id: self._release(db, request_id, reason) for request_id, reason in entries}

    def _release(self, db, request_id: str, reason: str) -> bool:
        charge = db.execute(
            select(charges_table).where(charges_table.c.request_id == request_id)
        ).one_or_none()
        if charge is None or charge.state != "reserved":
            return False
        db.execute(
            update(charges_table)
            .where(charges_table.c.request_id == request_id, charges_table.c.state == "reserved")
            .values(state="released", settled_at=time.time(), note=reason[:500])
        )
        if not charge.free:
            db.execute(
                update(allocations_table)
                .where(allocations_table.c.project == charge.project, allocations_table.c.site == charge.site)
                .values(reserved_usu=allocations_table.c.reserved_usu - charge.estimate_usu)
            )
        return True

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
            return [
                Charge(
                    r.request_id, r.project, r.site, r.identity, r.model, r.version, r.kind, r.free, r.state,
                    r.estimate_usu, r.charged_usu, r.prompt_tokens, r.completion_tokens, r.activation_bytes,
                    r.cold_start, r.created_at, r.note,
                )
                for r in db.execute(query)
            ]
