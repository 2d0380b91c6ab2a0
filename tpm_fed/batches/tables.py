"""Tables for batches, in the same database as the ledger (so a line's record and its charge live together).

Kept in their own ``MetaData`` and created by :class:`~tpm_fed.batches.store.BatchStore` when it opens, so
the rest of the state schema does not change for them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

batch_metadata = MetaData()

batch_files_table = Table(
    "batch_files",
    batch_metadata,
    Column("file_id", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("filename", String(400), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("content", LargeBinary, nullable=False),  # files uploaded before parts: whole here; since, empty
    Column("expires_at", Float),  # None: never (files uploaded before expiry)
)

batch_file_parts_table = Table(
    "batch_file_parts",
    batch_metadata,
    Column("file_id", String(64), primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("content", LargeBinary, nullable=False),
)
"""An upload's bytes, a part (:data:`~tpm_fed.batches.protocol.FILE_PART_BYTES`) per row, in order: written and
read a part at a time, so no upload is ever held whole in the service's memory."""

batches_table = Table(
    "batches",
    batch_metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("project", String(200), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata_json", Text),
    Column("quote_json", Text),
    Column("created_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("expires_at", Float),
    Column("expired_at", Float),
)

batch_lines_table = Table(
    "batch_lines",
    batch_metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line_index", Integer, primary_key=True),  # 0-based, in the input file's order
    Column("custom_id", String(512), nullable=False),
    Column("url", String(64), nullable=False),
    Column("body", Text, nullable=False),  # JSON, as the file gave it
    Column("state", String(16), nullable=False),  # pending | running | done | failed | cancelled
    Column("attempts", Integer, nullable=False, default=0),
    # Every request id a run of this line was submitted under (space-separated): the ledger's rows for
    # the line, so its charge is the ledger's word, and a restart can ask the ledger what happened.
    Column("request_ids", Text, nullable=False, default=""),
    Column("status_code", Integer),
    Column("response", Text),  # JSON: the route's answer, or its error body
    Column("error", Text),  # JSON: why the line never ran (cancelled)
    Column("charged_usu", BigInteger, nullable=False, default=0),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("finished_at", Float),
    # A line the broker could not place yet (no replica can take it now) waits until then; not a failure.
    Column("not_before", Float),
    Column("deferrals", Integer, nullable=False, default=0),
    Index("batch_lines_by_state", "state", "batch_id"),
)

batch_results_table = Table(
    "batch_results",
    batch_metadata,
    # A batch line's result, written in the very transaction that settles its charge (the bookkeeper's), so a
    # service killed before the line's answer is recorded leaves the result beside the charge: the next
    # service answers the line from it instead of running (and charging) it again. Deleted once the line ends.
    Column("request_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("result", Text, nullable=False),  # the result's wire form (JSON)
    Column("created_at", Float, nullable=False),
)
