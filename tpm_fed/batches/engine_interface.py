"""What the batch package needs of the federation engine, and nothing more.

The composition root hands the runner and the quoting the engine itself
(:class:`tpm_fed.service.runtime.Runtime` today); this Protocol says which
part of it they use, so a batch never reaches for the rest (and a test may
hand a fake).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Protocol

from tpm_fed.broker import Broker
from tpm_fed.federation import Federation
from tpm_fed.ledger import Ledger
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


class BatchEngine(Protocol):
    federation: Federation
    """Sites and prices: the runner's window, a quote's cold starts."""
    broker: Broker
    """Replica paces: when a batch would end."""
    ledger: Ledger
    """Balances: what a project can pay."""

    def submit(self, request: ServingRequest, identity: str | None = None, *,
               background: bool = False) -> Future[ServedResult]: ...

    def quote(self, request: ServingRequest, identity: str | None = None) -> Quote: ...

    def quotes(self, requests: list[ServingRequest], identity: str | None = None) -> list[Quote | TpmError]: ...

    def burst(self) -> AbstractContextManager[None]: ...

    def add_outcome_writer(self, writer: Callable[[dict[str, Any], Any], None]) -> None: ...


class Observer(Protocol):
    """Told of every request that ends, as the routes tell it (the service's metrics)."""

    def observe(self, kind: str, model: str, seconds: float, result: Any = None,
                error: BaseException | None = None) -> None: ...
