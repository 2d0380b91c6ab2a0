"""A batch's output and error files: not stored, read from its ended lines."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import Engine, select

from tpm_fed.batches.protocol import LineError, LineResponse, OutputLine
from tpm_fed.batches.tables import batch_lines_table

OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"
"""A batch's output and error files are not stored: they are read from its lines, named after it."""


class BatchOutputs:
    """The output and error files of :class:`~tpm_fed.batches.store.BatchStore`'s batches."""

    engine: Engine

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
