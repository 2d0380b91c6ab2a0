"""Batches: created with all their lines (the quote's bound checked against the project's balance), read
back as OpenAI's batch objects, listed, cancelled."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from tpm_fed.batches.outputs import ERRORS_SUFFIX, OUTPUT_SUFFIX
from tpm_fed.batches.protocol import (
    WINDOW_S, BatchCreateBody, BatchInputLine, BatchObject, BatchQuote, BatchTpm, BatchUsage, LineError, RequestCounts,
)
from tpm_fed.batches.rows import _newest_first, _second
from tpm_fed.batches.tables import batch_lines_table, batches_table
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted
from tpm_fed.state.schema import MICRO


class BatchRecords:
    """The batches part of :class:`~tpm_fed.batches.store.BatchStore`."""

    engine: Engine

    def create_batch(self, owner: str, project: str, body: BatchCreateBody, lines: list[BatchInputLine],
                     quote: BatchQuote | None) -> str:
        """Record a batch and all its lines, pending, in one transaction (the runner starts from there).

        With a ``quote``, its bound is checked against the project's balance in that same transaction:
        the balance less what the project's open batches still have to run (their lines reserve only
        when they run), with the project's allocation rows locked. So two batches created at once, or
        one after another before the first ran, cannot together promise more than the project has.

        Raises:
            InsufficientBalance: The bound does not fit what is left (nothing is recorded).
        """
        batch_id = f"batch_{secrets.token_hex(12)}"
        now = time.time()
        with self.engine.begin() as db:  # SQLite: BEGIN IMMEDIATE, so creates run one at a time
            if quote is not None:
                _check_uncommitted_balance(db, project, quote)
            db.execute(insert(batches_table).values(
                batch_id=batch_id, owner=owner, project=project, endpoint=body.endpoint,
                input_file_id=body.input_file_id, completion_window=body.completion_window, status="in_progress",
                metadata_json=json.dumps(body.metadata) if body.metadata is not None else None,
                quote_json=quote.model_dump_json() if quote is not None else None,
                created_at=now, in_progress_at=now, expires_at=now + WINDOW_S))
            db.execute(insert(batch_lines_table), [
                {"batch_id": batch_id, "line_index": index, "custom_id": line.custom_id, "url": line.url,
                 "body": json.dumps(line.body), "state": "pending", "attempts": 0, "deferrals": 0, "request_ids": "",
                 "charged_usu": 0, "prompt_tokens": 0, "completion_tokens": 0}
                for index, line in enumerate(lines)])
        return batch_id

    def batch(self, batch_id: str, identity: str) -> BatchObject:
        """Raises NotPermitted: no such batch, or someone else's (the same answer for both)."""
        with self.engine.connect() as db:
            row = db.execute(select(batches_table).where(batches_table.c.batch_id == batch_id)).first()
            if row is None or row.owner != identity:
                raise NotPermitted(f"no batch {batch_id!r} of yours")
            return self._object(db, row)

    def batches_of(self, identity: str, after: str | None = None, limit: int = 20) -> tuple[list[BatchObject], bool]:
        """``identity``'s batches, newest first, after the batch ``after`` (OpenAI's cursor); and whether more."""
        b = batches_table.c
        with self.engine.connect() as db:
            rows, more = _newest_first(db, select(batches_table), b.batch_id, b, identity, after, limit, "batch")
            return [self._object(db, row) for row in rows], more

    def cancel(self, batch_id: str, identity: str) -> BatchObject:
        """Stop a batch: its pending lines never run; lines running now finish (and are charged).

        Raises:
            InvalidRequest: The batch already ended (completed, failed, expired, cancelled lines are final).
        """
        now = time.time()
        b, line = batches_table.c, batch_lines_table.c
        with self.engine.begin() as db:
            row = db.execute(select(b.owner, b.status).where(b.batch_id == batch_id)).first()
            if row is None or row.owner != identity:
                raise NotPermitted(f"no batch {batch_id!r} of yours")
            if row.status in ("completed", "failed", "expired", "cancelled"):
                raise InvalidRequest(f"batch {batch_id} is {row.status}; only a batch in progress can be cancelled")
            if row.status == "in_progress":
                db.execute(update(batches_table).where(b.batch_id == batch_id, b.status == "in_progress")
                           .values(status="cancelling", cancelling_at=now))
                never_ran = LineError(code="batch_cancelled", message="the batch was cancelled before this line ran")
                db.execute(update(batch_lines_table).where(line.batch_id == batch_id, line.state == "pending")
                           .values(state="cancelled", error=never_ran.model_dump_json(), finished_at=now))
        return self.batch(batch_id, identity)

    def _object(self, db: Any, row: Any) -> BatchObject:
        line = batch_lines_table.c
        per_state = {state: (count, charged, prompt, completion) for state, count, charged, prompt, completion in
                     db.execute(select(line.state, func.count(), func.sum(line.charged_usu),
                                       func.sum(line.prompt_tokens), func.sum(line.completion_tokens))
                                .where(line.batch_id == row.batch_id).group_by(line.state))}

        def total(index: int, *states: str) -> int:
            return int(sum((per_state.get(state, (0, 0, 0, 0))[index] or 0) for state in states))

        ran = ("done", "failed")
        prompt, completion = total(2, *ran), total(3, *ran)
        ended = row.status in ("completed", "cancelled", "expired")
        hex_id = row.batch_id.removeprefix("batch_")
        quote = BatchQuote.model_validate_json(row.quote_json) if row.quote_json else None
        return BatchObject(
            id=row.batch_id, endpoint=row.endpoint, input_file_id=row.input_file_id,
            completion_window=row.completion_window, status=row.status,
            output_file_id=f"file-{hex_id}{OUTPUT_SUFFIX}" if ended and total(0, "done") else None,
            error_file_id=f"file-{hex_id}{ERRORS_SUFFIX}" if ended and total(0, "failed", "cancelled") else None,
            created_at=int(row.created_at), in_progress_at=_second(row.in_progress_at),
            expires_at=_second(row.expires_at), finalizing_at=_second(row.finalizing_at),
            completed_at=_second(row.completed_at), cancelling_at=_second(row.cancelling_at),
            cancelled_at=_second(row.cancelled_at), expired_at=_second(row.expired_at),
            request_counts=RequestCounts(total=total(0, *per_state), completed=total(0, "done"),
                                         failed=total(0, "failed")),
            usage=BatchUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion),
            metadata=json.loads(row.metadata_json) if row.metadata_json else None,
            tpm=BatchTpm(project=row.project, charged_su=total(1, *ran) / MICRO, prompt_tokens=prompt,
                         completion_tokens=completion, running=total(0, "running"), pending=total(0, "pending"),
                         cancelled=total(0, "cancelled"), quote=quote,
                         estimated_finish_at=_estimated_finish(row, quote, total(0, *ran),
                                                               total(0, "pending", "running"))),
        )


def _estimated_finish(row: Any, quote: BatchQuote | None, ended: int, left: int) -> float | None:
    """When a batch in progress should end: at the pace its lines have ended so far, else as quoted."""
    if row.status != "in_progress" or not left:
        return None
    now = time.time()
    if ended:
        return now + left * (now - row.in_progress_at) / ended
    return row.in_progress_at + quote.estimated_s if quote is not None else None


def _check_uncommitted_balance(db: Any, project: str, quote: BatchQuote) -> None:
    """Refuse ``quote`` unless each site's balance, less the open batches' unrun share, holds its bound."""
    from tpm_fed.batches.quoting import check_balance
    from tpm_fed.state.schema import allocations_table

    a, b, line = allocations_table.c, batches_table.c, batch_lines_table.c
    # PostgreSQL: a second create for this project waits here until the first commits (and then sees it).
    available = {row.site: (row.granted_usu - row.spent_usu - row.reserved_usu) / MICRO for row in db.execute(
        select(a.site, a.granted_usu, a.spent_usu, a.reserved_usu).where(a.project == project).with_for_update())}
    open_batches = db.execute(select(b.batch_id, b.quote_json).where(
        b.project == project, b.status == "in_progress", b.quote_json.is_not(None))).all()
    for batch_id, quote_json in open_batches:
        counts = dict(db.execute(select(line.state, func.count()).where(line.batch_id == batch_id)
                                 .group_by(line.state)).all())
        total = sum(counts.values())
        # Lines not yet ended: pending ones have reserved nothing; a running one may not have yet.
        unrun = (counts.get("pending", 0) + counts.get("running", 0)) / total if total else 0.0
        for site, bound in BatchQuote.model_validate_json(quote_json).max_su_per_site.items():
            available[site] = available.get(site, 0.0) - bound * unrun
    check_balance(quote.model_copy(update={"available_su": {site: available.get(site, 0.0)
                                                            for site in quote.max_su_per_site}}))
