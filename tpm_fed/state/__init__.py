"""What the federation remembers between runs, in one SQL database."""

from tpm_fed.state.request_log import RequestLog

__all__ = ["RequestLog"]
