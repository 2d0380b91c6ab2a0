"""What a function's failure at an endpoint becomes on the caller's side."""

from __future__ import annotations

from tpm_fed.protocol.errors import PayloadTooLarge, RemoteExecutionError, SiteError, TpmError

LOST_WORKER_ERRORS = ("WorkerLost", "ManagerLost", "ReplicaLost")
"""Parsl's names for a worker process (or a whole node's manager) that died with the task, and
ours for a rank of a split replica that died (the worker stopped the others): the site failed,
not the function, so the task may run again elsewhere."""


def error_from_traceback(site: str, traceback_text: str) -> TpmError:
    """The typed error for a remote traceback, with the remote message in it.

    A result over the service's size limit becomes :class:`PayloadTooLarge`;
    a worker lost with its task :class:`SiteError` (the request never got its
    answer: it may be tried again); anything else :class:`RemoteExecutionError`
    carrying the whole traceback.
    """
    if any(name in last_line(traceback_text) for name in LOST_WORKER_ERRORS):
        return SiteError(f"site {site!r}: the worker running the task was lost ({last_line(traceback_text)})")
    if "MaxResultSizeExceeded" in traceback_text:
        return PayloadTooLarge(
            f"site {site!r}: the result is over the 10 MB a task may return "
            f"({last_line(traceback_text)}); ask for less per request"
        )
    return RemoteExecutionError(f"site {site!r}: {last_line(traceback_text)}", remote_traceback=traceback_text)


def last_line(traceback_text: str) -> str:
    """The exception line of a remote traceback (its last non-decoration line)."""
    lines = [
        line.strip()
        for line in traceback_text.splitlines()
        if line.strip() and not set(line.strip()) <= {"+", "-"}
    ]
    return lines[-1] if lines else "the function raised"
