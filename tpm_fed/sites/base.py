"""The protocol every way of reaching a site implements."""

from __future__ import annotations

from tpm_fed.protocol.entrypoints import WorkerFunction

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class SiteStatus:
    """A site as its owner sees it right now.

    Attributes:
        name: Site name.
        access: How the site is reached (``local``, ``parsl``, ``globus-compute``).
        state: ``stopped`` (not started), ``starting``, ``running``, ``failed``, or
            ``offline`` (a Globus Compute endpoint that is not connected).
        workers: Worker processes (replica slots) the site may run.
        outstanding_tasks: Tasks submitted and not yet finished.
        detail: Free text (the failure, the engine's address...).
    """

    name: str
    access: str
    state: Literal["stopped", "starting", "running", "failed", "offline"]
    workers: int
    outstanding_tasks: int
    detail: str = ""


class Site(Protocol):
    """Runs functions where the replicas live.

    ``submit`` returns a future of the function's return value; a function
    that raised remotely fails the future with
    :class:`~tpm_fed.errors.RemoteExecutionError`, and a site that cannot run
    anything fails it with :class:`~tpm_fed.errors.SiteError`.

    ``problem`` is asked before the broker places a request here: a reason
    not to (an endpoint that is offline), or ``None``.
    """

    name: str

    def submit(self, function: WorkerFunction, *args: Any, **kwargs: Any) -> Future[Any]: ...

    def status(self) -> SiteStatus: ...

    def problem(self) -> str | None: ...

    def shutdown(self) -> None: ...
