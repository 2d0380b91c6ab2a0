"""One SQLAlchemy engine for the request log, the replica registry and the ledger.

SQLite (the embedded default) is set up for many writers: WAL so readers do
not block, ``BEGIN IMMEDIATE`` so a write transaction takes the write lock
at its start (two transactions that read then write can otherwise deadlock
and fail with "database is locked"), and a busy timeout so waiting writers
queue instead of failing. Any other SQLAlchemy URL (PostgreSQL) is used as is.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as error:  # the URL names a driver (psycopg) this install lacks
            raise MissingDependency(
                f"the database URL needs the Python package {error.name!r}, which is not installed: "
                "for PostgreSQL, pip install 'tpm-fed[postgres]' and use postgresql+psycopg://...") from None
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
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
