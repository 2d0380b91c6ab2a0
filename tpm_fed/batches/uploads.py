"""Uploaded files: stored a part at a time under each identity's quota, listed, read back, expired, deleted;
a batch's output and error files reached by their ids too."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from sqlalchemy import Engine, delete, func, insert, select

from tpm_fed.batches.outputs import ERRORS_SUFFIX, OUTPUT_SUFFIX
from tpm_fed.batches.protocol import FILE_PART_BYTES, FileObject
from tpm_fed.batches.rows import _newest_first, _second
from tpm_fed.batches.tables import batch_file_parts_table, batch_files_table
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, PayloadTooLarge


class UploadedFiles:
    """The files part of :class:`~tpm_fed.batches.store.BatchStore` (which gives it ``batch`` and
    ``output_lines`` for a batch's output and error files)."""

    engine: Engine
    upload_quota_bytes: int

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
