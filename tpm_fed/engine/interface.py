"""The one typed interface to the federation engine: what the HTTP layer, the batch runner and the
in-process conveniences may call (vLLM's entrypoints take an ``EngineClient`` the same way).

Everything else about the engine (its dispatchers, sites, bookkeeping) stays
behind it. :class:`tpm_fed.service.runtime.Runtime` satisfies it, and
``tests/test_engine_runtime.py`` checks that it does.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from tpm_fed.broker import Broker, Decision
from tpm_fed.catalog import ModelCatalog
from tpm_fed.federation import Federation
from tpm_fed.ledger import Ledger
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult
from tpm_fed.references.records import ReferenceRecords
from tpm_fed.sites import SiteStatus
from tpm_fed.state import RequestLog


class Callers(Protocol):
    """What the engine asks about a caller besides their name (:mod:`tpm_fed.service.callers` has the
    service's answers: local, or Globus)."""

    def groups_of(self, identity: str) -> frozenset[str]:
        """The Globus Groups ``identity`` is an active member of (UUIDs as strings)."""
        ...

    def compute_client_factory(self, identity: str) -> Callable[[], Any] | None:
        """Makes a Globus Compute client acting as ``identity``; None: use the service's own."""
        ...


class TaskChannels(Protocol):
    """The service's back channel as the engine uses it (:class:`tpm_fed.service.back_channel_hub.BackChannelHub`,
    handed to the engine at construction by the composition root, :mod:`tpm_fed.service.assembly`)."""

    def open(self, request_ids: list[str], joins: Any = None) -> dict[str, str] | None:
        """A channel for a task carrying ``request_ids`` (its address, for the worker), with the task's
        hooks for requests that join it (``joins``); None: nobody listens, the task runs without one."""
        ...

    def close(self, token: str) -> None:
        """The task ended: its channel takes nothing more."""
        ...


@runtime_checkable
class EngineClient(Protocol):
    """A running federation engine."""

    owner: str
    """The identity calls run as when they name none."""
    federation: Federation
    catalog: ModelCatalog
    channels: TaskChannels | None
    """The back channel it was handed at construction (None: in-process only, nothing streams or joins)."""

    # The five calls of the engine proper.
    def submit(self, request: ServingRequest, identity: str | None = None, *,
               background: bool = False) -> Future[ServedResult]: ...

    async def submit_async(self, request: ServingRequest, identity: str | None = None, *,
                           background: bool = False) -> Future[ServedResult]:
        """As ``submit``, from the event loop (the routes): placement holds no thread."""
        ...

    def quote(self, request: ServingRequest, identity: str | None = None) -> Quote: ...

    def quotes(self, requests: list[ServingRequest], identity: str | None = None) -> list[Quote | TpmError]: ...

    def explain(self, request: ServingRequest, identity: str | None = None) -> Decision: ...

    def status(self) -> list[SiteStatus]: ...

    def close(self) -> None: ...

    # What the batch runner adds: bursts that leave together, and its results in the charges' transaction.
    def burst(self) -> AbstractContextManager[None]: ...

    def add_outcome_writer(self, writer: Callable[[dict[str, Any], Any], None]) -> None: ...

    # Who pays.
    def project_for(self, identity: str, asked: str | None) -> str: ...

    def projects_of(self, identity: str) -> list[str]: ...

    def all_projects(self) -> list[str]: ...

    # Read-only views for the routes (records, statements, queues, models).
    def points(self, model: str | None = None) -> PointCatalog: ...

    def queue_place(self, request_id: str) -> dict[str, Any] | None: ...

    def waiting_per_replica(self) -> dict[str, int]: ...

    def request_record(self, request_id: str) -> dict[str, Any] | None: ...

    def statement(self, project: str, since: float | None = None) -> list[dict[str, Any]]: ...

    def balances(self, project: str) -> list[dict[str, Any]]: ...

    def model_cards(self) -> list[dict[str, Any]]: ...

    def sites_report(self) -> dict[str, Any]: ...

    # The stores the views and the batch store read (the same database as the engine's).
    @property
    def ledger(self) -> Ledger: ...

    @property
    def log(self) -> RequestLog: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def references(self) -> ReferenceRecords: ...
