"""The allocations and charges as they stand: grants set from the federation file, balances and statements
read."""

from __future__ import annotations

from sqlalchemy import Engine, and_, insert, select, update

from tpm_fed.ledger.records import Balance, Charge
from tpm_fed.state.schema import MICRO, allocations_table, charges_table


class LedgerBalances:
    """The balances part of :class:`~tpm_fed.ledger.ledger.Ledger`."""

    engine: Engine

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
