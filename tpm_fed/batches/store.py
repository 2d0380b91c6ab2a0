"""Files, batches and their lines in the service's database: the batch API's memory across restarts.

Every change of a line's state is one conditional transaction (``WHERE state
= ...``), so a line is claimed by one run, finished once, and a cancel and
the runner racing for the same pending line cannot both win. A line's charge
is never our own arithmetic: it is the ledger's, summed over the request ids
the line was submitted under.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, select, update

from tpm_fed.batches.protocol import (
    BatchCreateBody, BatchInputLine, BatchObject, BatchQuote, BatchTpm, BatchUsage, FILE_PART_BYTES, FileObject, LineError, LineResponse, OutputLine, RequestCounts, UPLOAD_QUOTA_BYTES, UPLOAD_QUOTA_VARIABLE, WINDOW_S,
)
from tpm_fed.batches.tables import (
    batch_file_parts_table, batch_files_table, batch_lines_table, batch_metadata, batch_results_table, batches_table,
)
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, PayloadTooLarge
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.state.database import add_missing_columns
from tpm_fed.state.schema import MICRO, charges_table

OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"
"""A batch's output and error files are not stored: they are read from its lines, named after it."""


@dataclass(frozen=True)
class ClaimedLine:
    """A line the runner took to run."""

    batch_id: str
    index: int
    custom_id: str
    url: str
    body: dict[str, Any]
    attempts: int
    deferrals: int
    owner: str
    project: str
    request_ids: tuple[str, ...] = ()
    """The ids earlier runs of the line went out under (a stopped service's)."""


class BatchStore:
    """Args:
        upload_quota_bytes: Bytes of unexpired uploads one identity may keep (``TPM_UPLOAD_QUOTA_BYTES``, else
            :data:`~tpm_fed.batches.protocol.UPLOAD_QUOTA_BYTES`).
    """

    def __init__(self, engine: Engine, *, upload_quota_bytes: int | None = None) -> None:
        self.engine = engine
        self.upload_quota_bytes = upload_quota_bytes if upload_quota_bytes is not None else int(
            os.environ.get(UPLOAD_QUOTA_VARIABLE) or UPLOAD_QUOTA_BYTES)
        batch_metadata.create_all(engine)
        add_missing_columns(engine, batch_metadata)

    # ----- files ---------------------------------------------------------------------
    def quota_left(self, owner: str) -> int:
        """Bytes ``owner`` may still upload (their unexpired files count against the quota)."""
        with self.engine.connect() as db:
            return max(0, self.upload_quota_bytes - _stored_bytes(db, owner, time.time()))

    def add_file(self, owner: str, filename: str, source: BinaryIO, size: int, lines: int,
                 expires_at: float | None, purpose: str = "batch") -> FileObject:
        """Store an upload already checked, copied from ``source`` a part at a time (never whole in memory).

        Raises:
            PayloadTooLarge: It would take ``owner`` over their quota (checked in the same transaction as
                the insert, so two uploads at once cannot both pass it); nothing is stored.
        """
        file_id = f"file-{secrets.token_hex(12)}"
        now = time.time()
        with self.engine.begin() as db:
            used = _stored_bytes(db, owner, now)
            if used + size > self.upload_quota_bytes:
                raise PayloadTooLarge(_over_quota(size, used, self.upload_quota_bytes))
            db.execute(insert(batch_files_table).values(
                file_id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, lines=lines,
                created_at=now, content=b"", expires_at=expires_at))
            part = 0
            while data := source.read(FILE_PART_BYTES):
                db.execute(insert(batch_file_parts_table).values(file_id=file_id, part=part, content=data))
                part += 1
        return FileObject(id=file_id, bytes=size, created_at=int(now), filename=filename, purpose=purpose,
                          expires_at=_second(expires_at))

    def sweep_expired_files(self) -> int:
        """Delete every expired upload (its row and its parts); returns how many."""
        f, part = batch_files_table.c, batch_file_parts_table.c
        with self.engine.begin() as db:
            expired = [row.file_id for row in db.execute(select(f.file_id).where(
                f.expires_at.is_not(None), f.expires_at <= time.time()))]
            if expired:
                db.execute(delete(batch_file_parts_table).where(part.file_id.in_(expired)))
                db.execute(delete(batch_files_table).where(f.file_id.in_(expired)))
        return len(expired)

    def file(self, file_id: str, identity: str) -> FileObject:
        """An uploaded file, or a batch's output or error file, if ``identity`` owns it.

        Raises:
            NotPermitted: No such file, or someone else's (one answer for both: ids are not an oracle).
        """
        derived = self._derived(file_id)
        if derived is not None:
            batch_id, which = derived
            batch = self.batch(batch_id, identity)
            if (batch.output_file_id if which == OUTPUT_SUFFIX else batch.error_file_id) != file_id:
                raise NotPermitted(f"no file {file_id!r} of yours (the batch has no such file yet)")
            size = sum(len(line) for line in self.output_lines(batch_id, which))
            ended_at = batch.completed_at or batch.cancelled_at or batch.expired_at or 0
            return FileObject(id=file_id, bytes=size, created_at=ended_at, filename=f"{batch_id}{which}.jsonl",
                              purpose="batch_output")
        row = self._file_row(file_id, identity, content=False)
        return FileObject(id=row.file_id, bytes=row.bytes, created_at=int(row.created_at), filename=row.filename,
                          purpose=row.purpose, expires_at=_second(row.expires_at))

    def files_of(self, identity: str, after: str | None = None, limit: int = 20) -> tuple[list[FileObject], bool]:
        """``identity``'s uploaded files, newest first (a page of ``limit`` after the file ``after``), and
        whether more follow. Output and error files are reached through their batches."""
        f = batch_files_table.c
        with self.engine.connect() as db:
            rows, more = _newest_first(db, select(f.file_id, f.filename, f.purpose, f.bytes, f.created_at,
                                                  f.expires_at).where(_unexpired(f, time.time())),
                                       f.file_id, f, identity, after, limit, "file")
        return [FileObject(id=r.file_id, bytes=r.bytes, created_at=int(r.created_at), filename=r.filename,
                           purpose=r.purpose, expires_at=_second(r.expires_at)) for r in rows], more

    def delete_file(self, file_id: str, identity: str) -> None:
        """Forget an uploaded file. Batches made from it keep their lines (copied when they were made).

        Raises:
            NotPermitted: No such file, or someone else's.
            InvalidRequest: A batch's output or error file (it is read from the batch's lines).
        """
        if self._derived(file_id) is not None:
            raise InvalidRequest(f"{file_id} is a batch's output or error file: it is read from the batch's "
                                 "lines and goes with the batch; only uploaded files can be deleted")
        f = batch_files_table.c
        with self.engine.begin() as db:
            if not db.execute(delete(batch_files_table).where(f.file_id == file_id, f.owner == identity)).rowcount:
                raise NotPermitted(f"no file {file_id!r} of yours")
            db.execute(delete(batch_file_parts_table).where(batch_file_parts_table.c.file_id == file_id))

    def file_content(self, file_id: str, identity: str) -> Iterator[bytes]:
        derived = self._derived(file_id)
        if derived is not None:
            self.file(file_id, identity)  # that the file exists, and is theirs
            return self.output_lines(*derived)
        row = self._file_row(file_id, identity, content=True)
        return iter([row.content]) if row.content else self._parts(file_id)

    def _parts(self, file_id: str) -> Iterator[bytes]:
        part = batch_file_parts_table.c
        index = 0
        while True:  # a part per query: a download, like an upload, holds one part at a time
            with self.engine.connect() as db:
                data = db.execute(select(part.content).where(part.file_id == file_id, part.part == index)).scalar()
            if data is None:
                return
            yield data
            index += 1

    def _file_row(self, file_id: str, identity: str, *, content: bool) -> Any:
        """Raises NotPermitted: no such file, someone else's, or expired (then swept: it is never read again)."""
        f = batch_files_table.c
        columns = [f.file_id, f.owner, f.filename, f.purpose, f.bytes, f.lines, f.created_at, f.expires_at]
        with self.engine.connect() as db:
            row = db.execute(select(*columns, *([f.content] if content else [])).where(f.file_id == file_id)).first()
        if row is None or row.owner != identity:
            raise NotPermitted(f"no file {file_id!r} of yours")
        if row.expires_at is not None and row.expires_at <= time.time():
            self.sweep_expired_files()
            raise NotPermitted(f"file {file_id!r} expired at {int(row.expires_at)} (unix time); upload it again")
        return row

    @staticmethod
    def _derived(file_id: str) -> tuple[str, str] | None:
        for suffix in (OUTPUT_SUFFIX, ERRORS_SUFFIX):
            if file_id.startswith("file-") and file_id.endswith(suffix):
                return f"batch_{file_id.removeprefix('file-').removesuffix(suffix)}", suffix
        return None

    # ----- batches -------------------------------------------------------------------
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

    # ----- results --------------------------------------------------------------------
    def output_lines(self, batch_id: str, which: str | None = None) -> Iterator[bytes]:
        """The JSONL lines of a batch's output file (``-output``), error file (``-errors``), or both
        (``None``: every line that ended), each in input order."""
        line = batch_lines_table.c
        states = {OUTPUT_SUFFIX: ["done"], ERRORS_SUFFIX: ["failed", "cancelled"]}.get(
            which or "", ["done", "failed", "cancelled"])
        hex_id = batch_id.removeprefix("batch_")
        with self.engine.connect() as db:
            rows = db.execute(select(line.line_index, line.custom_id, line.request_ids, line.status_code,
                                     line.response, line.error)
                              .where(line.batch_id == batch_id, line.state.in_(states))
                              .order_by(line.line_index)).all()
        for row in rows:
            response = None
            if row.response is not None:
                request_ids = row.request_ids.split()
                response = LineResponse(status_code=row.status_code, request_id=request_ids[-1] if request_ids
                                        else None, body=json.loads(row.response))
            error = LineError.model_validate_json(row.error) if row.error else None
            output = OutputLine(id=f"batch_req_{hex_id}_{row.line_index}", custom_id=row.custom_id,
                                response=response, error=error)
            yield output.model_dump_json().encode() + b"\n"

    # ----- the runner's side ---------------------------------------------------------------
    def recover(self) -> int:
        """Lines a stopped service left running go back to pending (their charges, if any, stay on them).

        Called once when a runner starts, before it claims anything: one service runs a database's batches.
        """
        line = batch_lines_table.c
        with self.engine.begin() as db:
            return db.execute(update(batch_lines_table).where(line.state == "running")
                              .values(state="pending")).rowcount

    def claim(self, limit: int) -> list[ClaimedLine]:
        """Up to ``limit`` pending lines of batches in progress, now running, shared fairly between projects.

        Projects take turns, a line each (the project whose oldest batch is oldest first), so a
        project's second batch, or another project's, does not wait for a large batch to end; within a
        project its oldest batch goes first, in input order.
        """
        if limit <= 0:
            return []
        b, line = batches_table.c, batch_lines_table.c
        ready = and_(line.state == "pending", b.status == "in_progress",
                     (line.not_before.is_(None)) | (line.not_before <= time.time()))
        with self.engine.begin() as db:
            open_batches = db.execute(select(b.batch_id, b.project).join(batch_lines_table, b.batch_id == line.batch_id)
                                      .where(ready).group_by(b.batch_id, b.project, b.created_at)
                                      .order_by(b.created_at, b.batch_id)).all()
            queues: dict[str, list[Any]] = {}  # project -> its lines in the order it runs them
            for batch_id, project in open_batches:
                if len(queues.get(project, ())) >= limit:
                    continue
                queues.setdefault(project, []).extend(db.execute(
                    select(line.batch_id, line.line_index, line.custom_id, line.url, line.body, line.attempts,
                           line.deferrals, b.owner, b.project, line.request_ids)
                    .join(batches_table, b.batch_id == line.batch_id)
                    .where(ready, line.batch_id == batch_id).order_by(line.line_index).limit(limit)).all())
            rows = _taking_turns(list(queues.values()), limit)
            # A row a concurrent cancel took meanwhile (READ COMMITTED) changes nothing and is not ours.
            claimed = [row for row in rows if db.execute(
                update(batch_lines_table).where(line.batch_id == row.batch_id, line.line_index == row.line_index,
                                                line.state == "pending").values(state="running")).rowcount == 1]
        return [ClaimedLine(r.batch_id, r.line_index, r.custom_id, r.url, json.loads(r.body), r.attempts,
                            r.deferrals, r.owner, r.project, tuple(r.request_ids.split())) for r in claimed]

    def submitted(self, runs: list[tuple[str, int, str]]) -> None:
        """Note the request id each run of a line goes out under (``(batch, line, request id)``), before it goes:
        one transaction for all, so a window of lines reaches the dispatcher together."""
        if not runs:
            return
        line = batch_lines_table.c
        with self.engine.begin() as db:
            db.execute(update(batch_lines_table)
                       .where(line.batch_id == bindparam("b"), line.line_index == bindparam("i"))
                       .values(request_ids=line.request_ids + " " + bindparam("rid")),
                       [{"b": batch_id, "i": index, "rid": request_id} for batch_id, index, request_id in runs])

    def finish(self, batch_id: str, index: int, *, state: str, status_code: int, response: dict[str, Any],
               prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record a line's end (``done`` or ``failed``) with its answer, and its charge as the ledger has it."""
        line, c = batch_lines_table.c, charges_table.c
        with self.engine.begin() as db:
            request_ids = db.execute(select(line.request_ids).where(line.batch_id == batch_id,
                                                                    line.line_index == index)).scalar_one().split()
            charged = db.execute(select(func.coalesce(func.sum(c.charged_usu), 0))
                                 .where(c.request_id.in_(request_ids or [""]), c.state == "settled")).scalar_one()
            db.execute(delete(batch_results_table).where(batch_results_table.c.request_id.in_(request_ids or [""])))
            db.execute(update(batch_lines_table)
                       .where(line.batch_id == batch_id, line.line_index == index, line.state == "running")
                       .values(state=state, status_code=status_code, response=json.dumps(response),
                               charged_usu=int(charged), prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens, finished_at=time.time(),
                               attempts=line.attempts + 1))

    @staticmethod
    def keep_results(db: Any, results: dict[str, Any]) -> None:
        """Write lines' results (``request id -> ServedResult``) in the caller's transaction (the bookkeeper's)."""
        if results:
            def kind_of(result: Any) -> str:
                return next(name for name, kind in KINDS.items() if type(result) is kind.result)

            now = time.time()
            db.execute(insert(batch_results_table), [
                {"request_id": rid, "kind": kind_of(result), "result": json.dumps(result.to_wire()),
                 "created_at": now} for rid, result in results.items()])

    def kept_results(self, request_ids: list[str]) -> dict[str, tuple[str, dict[str, Any], Any]]:
        """Results kept for these request ids whose charges are settled: ``id -> (kind, wire form, charge row)``."""
        if not request_ids:
            return {}
        r, c = batch_results_table.c, charges_table.c
        with self.engine.connect() as db:
            rows = db.execute(select(r.request_id, r.kind, r.result, c.project, c.charged_usu, c.estimate_usu, c.free)
                              .join(charges_table, c.request_id == r.request_id)
                              .where(r.request_id.in_(request_ids), c.state == "settled")).all()
        return {row.request_id: (row.kind, json.loads(row.result), row) for row in rows}

    def retry_later(self, batch_id: str, index: int) -> None:
        """A run failed once: the line goes back to the queue (its next failure is final)."""
        line = batch_lines_table.c
        with self.engine.begin() as db:
            db.execute(update(batch_lines_table)
                       .where(line.batch_id == batch_id, line.line_index == index, line.state == "running")
                       .values(state="pending", attempts=line.attempts + 1))

    def defer(self, batch_id: str, index: int, delay_s: float) -> None:
        """The broker could not place the line now: back to the queue after ``delay_s`` (not an attempt)."""
        line = batch_lines_table.c
        with self.engine.begin() as db:
            db.execute(update(batch_lines_table)
                       .where(line.batch_id == batch_id, line.line_index == index, line.state == "running")
                       .values(state="pending", not_before=time.time() + delay_s, deferrals=line.deferrals + 1))

    def settle_batches(self) -> list[str]:
        """Batches whose lines all ended become ``completed``; cancelling ones with none running, ``cancelled``.

        A batch still in progress at the end of its completion window *expires*, as OpenAI's do: its lines
        that never ran end with ``batch_expired`` (not charged), those running finish (and are charged),
        and then it is ``expired``, its finished lines in the output file and the rest in the error file.
        """
        b, line = batches_table.c, batch_lines_table.c
        now = time.time()
        ended = []
        expired = LineError(code="batch_expired",
                            message="the batch's completion window ended before this line ran; it was not charged")
        with self.engine.begin() as db:
            open_batches = db.execute(select(b.batch_id, b.status, b.expires_at)
                                      .where(b.status.in_(["in_progress", "cancelling"]))).all()
            for batch_id, status, expires_at in open_batches:
                expiring = status == "in_progress" and expires_at is not None and expires_at <= now
                if expiring:
                    db.execute(update(batch_lines_table).where(line.batch_id == batch_id, line.state == "pending")
                               .values(state="cancelled", error=expired.model_dump_json(), finished_at=now))
                unfinished = ["pending", "running"] if status == "in_progress" else ["running"]
                left = db.execute(select(func.count()).where(line.batch_id == batch_id,
                                                             line.state.in_(unfinished))).scalar_one()
                if left:
                    continue
                if expiring:
                    values = {"status": "expired", "expired_at": now}
                elif status == "in_progress":
                    values = {"status": "completed", "finalizing_at": now, "completed_at": now}
                else:
                    values = {"status": "cancelled", "cancelled_at": now}
                db.execute(update(batches_table).where(b.batch_id == batch_id, b.status == status).values(**values))
                ended.append(batch_id)
        return ended

    def has_work(self) -> bool:
        b = batches_table.c
        with self.engine.connect() as db:
            return db.execute(select(func.count()).where(b.status.in_(["in_progress", "cancelling"]))).scalar_one() > 0

    def request_ids(self, batch_id: str) -> list[str]:
        """Every request id the batch's lines were submitted under (their rows in the ledger)."""
        line = batch_lines_table.c
        with self.engine.connect() as db:
            return [rid for (ids,) in db.execute(select(line.request_ids).where(line.batch_id == batch_id))
                    for rid in ids.split()]


def _estimated_finish(row: Any, quote: BatchQuote | None, ended: int, left: int) -> float | None:
    """When a batch in progress should end: at the pace its lines have ended so far, else as quoted."""
    if row.status != "in_progress" or not left:
        return None
    now = time.time()
    if ended:
        return now + left * (now - row.in_progress_at) / ended
    return row.in_progress_at + quote.estimated_s if quote is not None else None


def _newest_first(db: Any, query: Any, key: Any, columns: Any, identity: str, after: str | None, limit: int,
                  what: str) -> tuple[list[Any], bool]:
    """A page of ``identity``'s rows of ``query``, newest first (ties by ``key``), after the row whose
    ``key`` is ``after`` (OpenAI's cursor); and whether more follow.

    Raises:
        InvalidRequest: ``after`` is not one of ``identity``'s.
    """
    query = query.where(columns.owner == identity)
    if after is not None:
        cursor = db.execute(select(columns.created_at).where(key == after, columns.owner == identity)).first()
        if cursor is None:
            raise InvalidRequest(f"after: no {what} {after!r} of yours")
        query = query.where((columns.created_at < cursor.created_at)
                            | and_(columns.created_at == cursor.created_at, key < after))
    rows = db.execute(query.order_by(columns.created_at.desc(), key.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def _taking_turns(queues: list[list[Any]], limit: int) -> list[Any]:
    """Up to ``limit`` items, one from each queue in turn (each queue's own order kept)."""
    taken: list[Any] = []
    depth = 0
    while len(taken) < limit and any(depth < len(queue) for queue in queues):
        taken.extend(queue[depth] for queue in queues if depth < len(queue))
        depth += 1
    return taken[:limit]


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


def _stored_bytes(db: Any, owner: str, now: float) -> int:
    """Bytes of ``owner``'s unexpired uploads: what counts against their quota."""
    f = batch_files_table.c
    return int(db.execute(select(func.coalesce(func.sum(f.bytes), 0)).where(
        f.owner == owner, _unexpired(f, now))).scalar_one())


def _unexpired(columns: Any, now: float) -> Any:
    return columns.expires_at.is_(None) | (columns.expires_at > now)


def _over_quota(size: int, used: int, quota: int) -> str:
    return (f"this upload of {size:,} bytes would take your stored files to {used + size:,} bytes; your quota is "
            f"{quota:,} (delete files you no longer need, or let them expire)")


def _second(at: float | None) -> int | None:
    return int(at) if at is not None else None
