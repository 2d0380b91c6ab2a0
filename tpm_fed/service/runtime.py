"""The engine as the service runs it: started at once, with the in-process calls and the report views.

:class:`Runtime` is :class:`~tpm_fed.engine.engine.Engine` (which starts
nothing until :meth:`~tpm_fed.engine.engine.Engine.start`) started by its
constructor, with the conveniences tests and benchmarks call
(:class:`~tpm_fed.engine.in_process.InProcessCalls`) and the read-only views
of :mod:`tpm_fed.service.reports`. It satisfies
:class:`~tpm_fed.engine.interface.EngineClient`, the interface the HTTP layer
and the batch runner use. One runtime serves every caller of a service; what
serves it over HTTP (the back channel, the serving objects, the batch runner,
the vector stores) is built around it by :mod:`tpm_fed.service.assembly`.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.engine import views
from tpm_fed.engine.engine import Engine
from tpm_fed.engine.in_process import InProcessCalls
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.service import reports
from tpm_fed.engine.interface import Callers, TaskChannels
from tpm_fed.service.callers import LocalCallers


class Runtime(InProcessCalls, Engine):
    """One federation, running: what ``tpm serve`` serves.

    Args:
        home: The tpm home (federation file, models, site run folders).
        database_url: The one ledger's database; the home's SQLite by default.
        owner: The identity in-process calls run as when they name none (the home's owner).
        callers: What the runtime asks about a caller besides their name: their Globus
            Groups, and a Globus Compute client acting as them for bring-your-own sites
            (:class:`~tpm_fed.service.callers.LocalCallers` by default: neither).
        channels: The service's back channel, handed by the composition root
            (:class:`~tpm_fed.service.assembly.ServiceAssembly`); None in-process only.

    Example (in-process, as tests and benchmarks use it):
        >>> with Runtime(home) as runtime:
        ...     result = runtime.generate("The telescope", max_new_tokens=16).result()
    """

    def __init__(self, home: TpmHome, *, database_url: str | None = None, owner: str | None = None,
                 callers: Callers | None = None, channels: TaskChannels | None = None) -> None:
        super().__init__(home, owner=owner or LocalUser().current(), callers=callers or LocalCallers(),
                         database_url=database_url, channels=channels)
        self.start()

    def queue_place(self, request_id: str) -> dict[str, Any] | None:
        return views.queue_place(self, request_id)

    def waiting_per_replica(self) -> dict[str, int]:
        """Requests admitted to each replica that no task carries yet (the rest of its queue runs)."""
        return self.pool.waiting_per_replica()

    def model_cards(self) -> list[dict[str, Any]]:
        return reports.model_cards(self)

    def request_record(self, request_id: str) -> dict[str, Any] | None:
        return reports.request_record(self, request_id)

    def statement(self, project: str, since: float | None = None) -> list[dict[str, Any]]:
        return reports.statement(self, project, since)

    def balances(self, project: str) -> list[dict[str, Any]]:
        return reports.balances(self, project)

    def sites_report(self) -> dict[str, Any]:
        return reports.sites_report(self)

    def __enter__(self) -> Runtime:
        return self
