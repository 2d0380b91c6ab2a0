"""The service's answer to an error it did not foresee (the bodies of foreseen ones are the contract's:
:mod:`tpm_fed.protocol.http_errors`)."""

from __future__ import annotations

import logging
import secrets

from tpm_fed.protocol.http_errors import HttpError


def unexpected_error(error: BaseException, logger: logging.Logger) -> HttpError:
    """A 500 for an error we did not foresee: its detail goes to the operator's log under a fresh id,
    and the caller gets only that id (an exception's text may hold a path, a file's bytes, a secret)."""
    error_id = f"err-{secrets.token_hex(8)}"
    logger.error("unexpected error %s", error_id, exc_info=(type(error), error, error.__traceback__))
    return HttpError(500, "server_error", "InternalError",
                     f"internal error {error_id}: the service's operator finds its detail in the log under that id")
