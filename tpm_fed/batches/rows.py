"""Shared by the store's files and batches: a page of one owner's rows, newest first, and times in whole
seconds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select

from tpm_fed.protocol.errors import InvalidRequest


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


def _second(at: float | None) -> int | None:
    return int(at) if at is not None else None
