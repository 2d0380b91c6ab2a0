"""Tables: the request log, the replica registry, the service-unit ledger and results left by reference.

Service units are stored as integers of micro-SUs (1 SU = 1,000,000), so
sums and balances are exact.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

MICRO = 1_000_000
"""Micro-SUs per service unit."""

requests_table = Table(
    "requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("version", String(64)),
    Column("site", String(200)),
    Column("replica_id", String(400)),
    Column("status", String(16), nullable=False),  # queued | done | failed
    Column("prompts", Integer, nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("submitted_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("error", Text),
    # What the work used, written with its outcome: what a reservation is settled
    # from when the ledger write of its batch failed (see tpm_fed.ledger.sweeper).
    Column("activation_bytes", BigInteger),
    Column("cold_start", Boolean),
)

replicas_table = Table(
    "replicas",
    metadata,
    Column("replica_id", String(400), primary_key=True),  # site/model@version/backend
    Column("site", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(64), nullable=False),
    Column("backend", String(32), nullable=False),
    Column("state", String(16), nullable=False),  # starting | warm | draining | stopped
    Column("holder", String(200), nullable=False),  # host:pid of the process that placed it
    Column("worker", String(400)),  # the worker-side replica id last reported
    Column("served_requests", Integer, nullable=False, default=0),
    Column("service_s", Float, nullable=False, default=1.0),  # moving average per batch
    Column("started_at", Float, nullable=False),
    Column("last_used", Float, nullable=False),
)

allocations_table = Table(
    "allocations",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("site", String(200), primary_key=True),
    Column("granted_usu", BigInteger, nullable=False, default=0),
    Column("spent_usu", BigInteger, nullable=False, default=0),
    Column("reserved_usu", BigInteger, nullable=False, default=0),
)

charges_table = Table(
    "charges",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("project", String(200), nullable=False),
    Column("site", String(200), nullable=False),
    Column("identity", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("version", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("free", Boolean, nullable=False),  # on the project's own (byo) site
    Column("state", String(16), nullable=False),  # reserved | settled | released
    Column("estimate_usu", BigInteger, nullable=False),
    Column("charged_usu", BigInteger, nullable=False, default=0),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("activation_bytes", BigInteger, nullable=False, default=0),
    Column("cold_start", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("settled_at", Float),
    Column("note", Text),
    # A reservation still held after its deadline, or whose holder (host:pid) is gone,
    # is in doubt: the sweeper settles it from the request log, or releases it.
    Column("deadline", Float),
    Column("holder", String(200)),
)

references_table = Table(
    "result_references",
    metadata,
    # A result left in its site's store (results by reference): its owner is the
    # request's (the charges table); the service reads and evicts it from here.
    Column("request_id", String(64), primary_key=True),
    Column("site", String(200), nullable=False),
    Column("reference", Text, nullable=False),  # TensorsReference JSON, with the store the federation names
    Column("expires_at", Float, nullable=False, index=True),
    Column("evicted_at", Float),
)
