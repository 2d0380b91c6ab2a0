"""What the federation remembers between runs, in one SQL database."""

from tpm_fed.state.database import open_database, writing_first
from tpm_fed.state.request_log import RequestLog

__all__ = ["RequestLog", "open_database", "writing_first"]
