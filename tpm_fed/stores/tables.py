"""Tables for vector stores, in the same database as the ledger (a store's charges live beside it).

Kept in their own ``MetaData`` and created when :class:`~tpm_fed.stores.registry.StoreRegistry` opens, as
the batch tables are. The chunks, their vectors and the index of each snapshot are files under the home
(``stores/<store>/``); the rows here say which snapshot is current and what each holds.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

store_metadata = MetaData()

vector_stores_table = Table(
    "vector_stores",
    store_metadata,
    Column("store_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("description", Text),
    Column("project", String(200), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("embedding_model", String(200), nullable=False),
    Column("chunking_json", Text),  # the store's default chunking (OpenAI's chunking_strategy)
    Column("metadata_json", Text),
    Column("expires_after_days", Integer),
    Column("published", Boolean, nullable=False, default=False),
    Column("snapshot_id", String(64)),  # the current snapshot; None until the first file is indexed
    Column("created_at", Float, nullable=False),
    Column("last_active_at", Float, nullable=False),
)

store_files_table = Table(
    "vector_store_files",
    store_metadata,
    Column("store_id", String(64), primary_key=True),
    Column("file_id", String(64), primary_key=True),
    Column("filename", String(400), nullable=False),
    Column("added_by", String(200), nullable=False),  # whose upload it is (read as them) and who pays
    Column("project", String(200), nullable=False),
    Column("batch_id", String(64)),
    Column("status", String(16), nullable=False),  # in_progress | completed | failed | cancelled
    Column("last_error_json", Text),
    Column("attributes_json", Text),
    Column("chunking_json", Text, nullable=False),
    Column("usage_bytes", BigInteger, nullable=False, default=0),
    Column("content_sha256", String(64)),  # of the file's bytes, once read: part of the snapshot's content id
    Column("created_at", Float, nullable=False),
    Index("vector_store_files_by_status", "status"),
)

store_batches_table = Table(
    "vector_store_file_batches",
    store_metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("store_id", String(64), nullable=False),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

store_snapshots_table = Table(
    "vector_store_snapshots",
    store_metadata,
    Column("store_id", String(64), primary_key=True),
    Column("snapshot_id", String(64), primary_key=True),  # the content id (see tpm_fed.stores.snapshots)
    Column("model", String(200), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("index_json", Text, nullable=False),
    Column("files", Integer, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),  # what change made it
    Column("created_at", Float, nullable=False),
    Column("collected_at", Float),  # its files removed by tpm stores gc; no longer searchable
)

store_charges_table = Table(
    "vector_store_charges",
    store_metadata,
    # Each ledger request id a store caused (embedding at ingestion or query, a search): the store's charges
    # are the ledger's rows for these ids, never a sum kept apart from the ledger.
    Column("request_id", String(64), primary_key=True),
    Column("store_id", String(64), nullable=False),
    Column("what", String(16), nullable=False),  # ingest | query | search
    Column("created_at", Float, nullable=False),
    Index("vector_store_charges_by_store", "store_id"),
)
