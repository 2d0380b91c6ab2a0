"""Settling and releasing reservations, exactly once: a conditional state transition of the charge rows,
and the balance moved only for the rows that transition changed."""

from __future__ import annotations

import time

from sqlalchemy import Connection, Engine

from tpm_fed.ledger.pricing import Metered
from tpm_fed.ledger.records import LedgerConflict, format_su
from tpm_fed.state.database import transaction


class LedgerSettlement:
    """The settlement part of :class:`~tpm_fed.ledger.ledger.Ledger`."""

    engine: Engine

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
