"""One SQLAlchemy engine for the request log, the replica registry and the ledger.

SQLite (the embedded default) is set up for many writers: WAL so readers do
not block, ``BEGIN IMMEDIATE`` so a write transaction takes the write lock
at its start (two transactions that read then write can otherwise deadlock
and fail with "database is locked"), and a busy timeout so waiting writers
queue instead of failing. Within one process, writers take turns on a lock
(:class:`_WriterTurns`) before SQLite's, so a waiting one starts the moment
the one before commits. Any other SQLAlchemy URL (PostgreSQL) is used as is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from tpm_fed.protocol.errors import MissingDependency
from tpm_fed.protocol.kinds import RENAMED_KINDS
from tpm_fed.state.schema import metadata

# Wave 1 recorded price tiers; a charge now records its request kind (RENAMED_KINDS maps the old names).


def open_database(url: str) -> Engine:
    """Connect, create missing tables, and return the engine."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        turns = _WriterTurns()
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", turns.begin)
        event.listen(engine, "commit", turns.commit)
        event.listen(engine, "rollback", turns.rollback)
        event.listen(engine.pool, "checkin", turns.checked_in)
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as error:  # the URL names a driver (psycopg) this install lacks
            raise MissingDependency(
                f"the database URL needs the Python package {error.name!r}, which is not installed: "
                "for PostgreSQL, pip install 'tpm-fed[postgres]' and use postgresql+psycopg://...") from None
        event.listen(engine, "begin", _no_writer_now)
    metadata.create_all(engine)
    _rename_tier_column(engine)
    add_missing_columns(engine)
    return engine


def transaction(engine: Engine, db: Connection | None) -> AbstractContextManager[Connection]:
    """``db`` itself when the caller passes its transaction (it commits), else a new transaction.

    How the request log, the ledger and the replica registry write one batch
    in one transaction.
    """
    return nullcontext(db) if db is not None else engine.begin()


def _rename_tier_column(engine: Engine) -> None:
    """Bring a wave-1 database (charges.tier) to the one-name vocabulary (charges.kind)."""
    columns = {column["name"] for column in inspect(engine).get_columns("charges")}
    if "tier" not in columns:
        return
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE charges RENAME COLUMN tier TO kind"))
        for old, new in RENAMED_KINDS.items():
            connection.execute(text("UPDATE charges SET kind = :new WHERE kind = :old"), {"new": new, "old": old})


def add_missing_columns(engine: Engine, tables: MetaData = metadata) -> None:
    """Add the nullable columns a table gained since the database was made (create_all adds only tables)."""
    inspector = inspect(engine)
    for table in tables.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
            except (OperationalError, ProgrammingError):  # another process added it first
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


def _sqlite_connect(connection, _record) -> None:
    connection.isolation_level = None  # we issue BEGIN ourselves, below
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(_BUSY_TIMEOUT)
    cursor.close()


BUSY_TIMEOUT_S = 30.0
"""How long a writer waits for the write lock (its turn in this process, then SQLite's) before it fails."""

_BUSY_TIMEOUT = f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}"


_FIRST = threading.local()
_NOW = threading.local()


class WriterBusy(Exception):  # noqa: N818 - a state, as SQLite's "database is locked" is
    """Inside :func:`writing_now`: the write lock is not free at once (nothing was written)."""


def writing_now() -> AbstractContextManager[None]:
    """Transactions this thread begins inside never wait for the database's write lock: on SQLite they take
    it only if no other writer holds it (this process's turn and SQLite's own lock), and raise
    :class:`WriterBusy` at once otherwise; on PostgreSQL, where a row lock may wait for another transaction,
    they raise it at once. For a write on an event loop, which must not stall behind another writer."""
    return _raised(_NOW)


def refuse_waiting_writer(engine: Engine) -> None:
    """Inside :func:`writing_now`, before a connection is even checked out: raise :class:`WriterBusy` where this
    engine's writers may wait for a lock (PostgreSQL; a checkout there is a round trip too)."""
    if getattr(_NOW, "on", False) and engine.dialect.name != "sqlite":
        raise WriterBusy("this database's writers may wait for a lock: not written now")


def _no_writer_now(connection: Connection) -> None:
    refuse_waiting_writer(connection.engine)


def writing_first() -> AbstractContextManager[None]:
    """Transactions this thread begins inside go ahead of this process's others waiting for an SQLite
    database's write lock: an interactive request's reservation does not queue behind a batch's bookkeeping.
    (PostgreSQL writers do not take turns: it has no one-writer lock.)"""
    return _raised(_FIRST)


@contextmanager
def _raised(flag: threading.local) -> Iterator[None]:
    """``flag.on`` set for this thread inside the block, and put back as it was after."""
    before = getattr(flag, "on", False)
    flag.on = True
    try:
        yield
    finally:
        flag.on = before


class _WriterTurns:
    """One SQLite writer at a time in this process, handed on without sleeping, those begun inside
    :func:`writing_first` ahead.

    A transaction that finds the database locked waits in SQLite's busy handler,
    which sleeps 1, 2, 5, 10... ms between tries: a reservation queued behind a
    batch's write slept ~3-4 ms beside a batch (docs/performance.md), though the
    write ahead of it took about one. Writers of this process queue here
    instead, taking their turn before ``BEGIN IMMEDIATE`` and giving it back once
    the transaction has committed or rolled back (so the one after never finds
    SQLite still locked by it). Other processes (``tpm`` commands on the same
    file) still meet SQLite's own wait.
    """

    def __init__(self) -> None:
        self._turns = threading.Condition()
        self._taken = False
        self._first_waiting = 0  # writers inside writing_first() waiting for their turn

    def _take(self) -> bool:
        if getattr(_NOW, "on", False):  # writing_now(): the turn if it is free, else no wait at all
            with self._turns:
                if self._taken:
                    raise WriterBusy("another writer of this process holds the database")
                self._taken = True
                return True
        first = getattr(_FIRST, "on", False)
        with self._turns:
            self._first_waiting += first
            try:
                taken = self._turns.wait_for(lambda: not self._taken and (first or not self._first_waiting),
                                             timeout=BUSY_TIMEOUT_S)
            finally:
                self._first_waiting -= first
            if taken:
                self._taken = True
            elif first:  # it waits no more: those it held back may go
                self._turns.notify_all()
            return taken

    def begin(self, connection: Connection) -> None:
        # A connection that begins while holding its turn (it never ended its transaction) keeps it.
        if not connection.info.get("writer_turn"):
            # Not given in time (a transaction left open): SQLite's busy timeout decides, as before.
            connection.info["writer_turn"] = self._take()
        now = getattr(_NOW, "on", False)
        try:
            if now:  # another process (a tpm command) may hold SQLite's own lock: fail, do not wait
                connection.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                if now:
                    connection.exec_driver_sql(_BUSY_TIMEOUT)
        except OperationalError as error:
            self._give_back(connection)
            if now and "locked" in str(error):
                raise WriterBusy("another process holds the database") from None
            raise
        except BaseException:
            self._give_back(connection)
            raise

    def commit(self, connection: Connection) -> None:
        """Commit here, then give the turn back (SQLAlchemy's own commit follows this event and, with no
        transaction open any more, does nothing)."""
        self._end(connection, "commit")

    def rollback(self, connection: Connection) -> None:
        self._end(connection, "rollback")

    def checked_in(self, _dbapi: Any, record: Any) -> None:
        """A connection back in the pool still holding its turn (dropped without ending its transaction;
        the pool rolled it back without telling :meth:`rollback`) gives it back."""
        self._give_back(record)

    def _end(self, connection: Connection, how: str) -> None:
        try:
            dbapi = None if connection.invalidated else connection.connection.dbapi_connection
            if dbapi is not None and dbapi.in_transaction:
                getattr(dbapi, how)()
        finally:
            self._give_back(connection)

    def _give_back(self, holder: Any) -> None:
        if holder.info.pop("writer_turn", False):
            with self._turns:
                self._taken = False
                self._turns.notify_all()
