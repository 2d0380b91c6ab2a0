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

:class:`Ledger` builds its statements once here; its parts are :mod:`~tpm_fed.ledger.reservations`,
:mod:`~tpm_fed.ledger.settlement` and :mod:`~tpm_fed.ledger.balances`, over :mod:`~tpm_fed.ledger.records`.
"""

from __future__ import annotations

from sqlalchemy import Engine, bindparam, insert, select, update

from tpm_fed.ledger.balances import LedgerBalances
from tpm_fed.ledger.records import DEFAULT_HOLD_S, Balance, Charge, Hold, LedgerConflict, format_su
from tpm_fed.ledger.reservations import LedgerReservations
from tpm_fed.ledger.settlement import LedgerSettlement
from tpm_fed.state.holders import this_process
from tpm_fed.state.schema import allocations_table, charges_table

__all__ = ["DEFAULT_HOLD_S", "Balance", "Charge", "Hold", "Ledger", "LedgerConflict", "format_su"]


class Ledger(LedgerReservations, LedgerSettlement, LedgerBalances):
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

