"""Files, batches and their lines in the service's database: the batch API's memory across restarts.

Every change of a line's state is one conditional transaction (``WHERE state
= ...``), so a line is claimed by one run, finished once, and a cancel and
the runner racing for the same pending line cannot both win. A line's charge
is never our own arithmetic: it is the ledger's, summed over the request ids
the line was submitted under.
"""

from __future__ import annotations

import os

from sqlalchemy import Engine

from tpm_fed.batches.batch_records import BatchRecords
from tpm_fed.batches.line_queue import ClaimedLine, LineEnd, LineQueue
from tpm_fed.batches.outputs import ERRORS_SUFFIX, OUTPUT_SUFFIX, BatchOutputs
from tpm_fed.batches.protocol import UPLOAD_QUOTA_BYTES, UPLOAD_QUOTA_VARIABLE
from tpm_fed.batches.tables import batch_metadata
from tpm_fed.batches.uploads import UploadedFiles
from tpm_fed.state.database import add_missing_columns

__all__ = ["BatchStore", "ClaimedLine", "ERRORS_SUFFIX", "LineEnd", "OUTPUT_SUFFIX"]


class BatchStore(UploadedFiles, BatchRecords, BatchOutputs, LineQueue):
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

