"""What the federation remembers between runs, in one SQL database."""

from tpm_fed.state.database import (
    WriterBusy,
    open_database,
    refuse_waiting_writer,
    writing_first,
    writing_now,
)
from tpm_fed.state.request_log import RequestLog

__all__ = ["RequestLog", "WriterBusy", "open_database", "refuse_waiting_writer", "writing_first", "writing_now"]
