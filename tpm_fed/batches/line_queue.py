"""The runner's side of the batch lines: claimed fairly between projects, noted as submitted, finished with
their charge as the ledger has it, retried or deferred; results kept for lines; batches settled when
their lines have all ended."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, bindparam, delete, func, insert, select, update

from tpm_fed.batches.protocol import LineError
from tpm_fed.batches.tables import batch_lines_table, batch_results_table, batches_table
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.state.database import transaction
from tpm_fed.state.schema import charges_table


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


@dataclass(frozen=True)
class LineEnd:
    """How a line ended, to record (:meth:`LineQueue.finish_many`)."""

    batch_id: str
    index: int
    state: str
    """``done`` or ``failed``."""
    status_code: int
    response: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_ids: tuple[str, ...] | None = None
    """The ids the line went out under, as the runner noted them (``submitted``); None: read them from the line."""


class LineQueue:
    """The lines part of :class:`~tpm_fed.batches.store.BatchStore`: what the runner calls."""

    engine: Engine

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
            # One statement per batch, not per line. A row a concurrent cancel took meanwhile (READ
            # COMMITTED) is not returned: it changed nothing and is not ours.
            taken = {(batch_id, index)
                     for batch_id, batch_indexes in _by_batch([(row.batch_id, row.line_index) for row in rows]).items()
                     for part in _parts(batch_indexes)
                     for (index,) in db.execute(update(batch_lines_table)
                                                .where(line.batch_id == batch_id, line.line_index.in_(part),
                                                       line.state == "pending")
                                                .values(state="running").returning(line.line_index))}
            claimed = [row for row in rows if (row.batch_id, row.line_index) in taken]
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
               prompt_tokens: int = 0, completion_tokens: int = 0) -> list[str]:
        """Record a line's end (``done`` or ``failed``) with its answer, and its charge as the ledger has it.

        Returns:
            The batch's id if this ended it (:meth:`finish_many`).
        """
        return self.finish_many([LineEnd(batch_id, index, state, status_code, response, prompt_tokens,
                                         completion_tokens)])

    def finish_many(self, ends: list[LineEnd], db: Any = None) -> list[str]:
        """Record the ends of many lines in one transaction (each as :meth:`finish` would): the runner records
        a task's lines together, not one transaction per line. A line no longer running (a cancel took it)
        is left as it is. In ``db``'s transaction if given (the bookkeeper's, which settles their charges).
        A batch these were the last lines of ends in the same transaction
        (``completed``, or ``cancelled``/``expired`` as :meth:`settle_batches` would say), so the runner
        need not look at every open batch after each task.

        Returns:
            The batches that ended.
        """
        if not ends:
            return []
        line = batch_lines_table.c
        with transaction(self.engine, db) as db:
            request_ids: dict[tuple[str, int], list[str]] = {
                (end.batch_id, end.index): list(end.request_ids) for end in ends if end.request_ids is not None}
            unknown = [(end.batch_id, end.index) for end in ends if end.request_ids is None]
            for batch_id, indexes in _by_batch(unknown).items():
                for part in _parts(indexes):
                    request_ids.update(((batch_id, index), ids.split()) for index, ids in db.execute(
                        select(line.line_index, line.request_ids)
                        .where(line.batch_id == batch_id, line.line_index.in_(part))))
            every_id = [rid for ids in request_ids.values() for rid in ids]
            charged: dict[str, int] = {}
            for part in _parts(every_id):
                charged.update(db.execute(_CHARGED, {"ids": part}).all())
                db.execute(_FORGET_KEPT, {"ids": part})
            now = time.time()
            db.execute(_END_LINE,
                       [{"b": end.batch_id, "i": end.index, "to": end.state, "code": end.status_code,
                         "answer": json.dumps(end.response), "prompt": end.prompt_tokens,
                         "completion": end.completion_tokens, "at": now,
                         "usu": int(sum(charged.get(rid, 0)
                                        for rid in request_ids.get((end.batch_id, end.index), ())))}
                        for end in ends])
            b = batches_table.c
            return self._settle(db, db.execute(select(b.batch_id, b.status, b.expires_at).where(
                b.batch_id.in_({end.batch_id for end in ends}), b.status.in_(["in_progress", "cancelling"]))).all(),
                now)

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
        b = batches_table.c
        with self.engine.begin() as db:
            open_batches = db.execute(select(b.batch_id, b.status, b.expires_at)
                                      .where(b.status.in_(["in_progress", "cancelling"]))).all()
            return self._settle(db, open_batches, time.time())

    @staticmethod
    def _settle(db: Any, open_batches: list[Any], now: float) -> list[str]:
        """:meth:`settle_batches` for ``open_batches`` (``(batch id, status, expires at)``), in ``db``'s transaction."""
        b, line = batches_table.c, batch_lines_table.c
        ended = []
        expired = LineError(code="batch_expired",
                            message="the batch's completion window ended before this line ran; it was not charged")
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


def _taking_turns(queues: list[list[Any]], limit: int) -> list[Any]:
    """Up to ``limit`` items, one from each queue in turn (each queue's own order kept)."""
    taken: list[Any] = []
    depth = 0
    while len(taken) < limit and any(depth < len(queue) for queue in queues):
        taken.extend(queue[depth] for queue in queues if depth < len(queue))
        depth += 1
    return taken[:limit]


_c, _r, _line = charges_table.c, batch_results_table.c, batch_lines_table.c
# finish_many's statements, built once: built per call (64 bound values each) they were a third of its CPU.
_CHARGED = (select(_c.request_id, func.sum(_c.charged_usu))
            .where(_c.request_id.in_(bindparam("ids", expanding=True)), _c.state == "settled")
            .group_by(_c.request_id))
_FORGET_KEPT = delete(batch_results_table).where(_r.request_id.in_(bindparam("ids", expanding=True)))
_END_LINE = (update(batch_lines_table)
             .where(_line.batch_id == bindparam("b"), _line.line_index == bindparam("i"), _line.state == "running")
             .values(state=bindparam("to"), status_code=bindparam("code"), response=bindparam("answer"),
                     charged_usu=bindparam("usu"), prompt_tokens=bindparam("prompt"),
                     completion_tokens=bindparam("completion"), finished_at=bindparam("at"),
                     attempts=_line.attempts + 1))

IN_LIST_MAX = 500
"""Most values in one ``IN (...)`` list (well under SQLite's and PostgreSQL's limits on bound parameters)."""


def _parts(values: list[Any]) -> list[list[Any]]:
    """``values`` in lists of at most :data:`IN_LIST_MAX`."""
    return [values[start:start + IN_LIST_MAX] for start in range(0, len(values), IN_LIST_MAX)]


def _by_batch(lines: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Line indexes grouped by batch."""
    grouped: dict[str, list[int]] = {}
    for batch_id, index in lines:
        grouped.setdefault(batch_id, []).append(index)
    return grouped
