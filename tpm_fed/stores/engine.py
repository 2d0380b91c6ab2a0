"""What the vector stores need of the federation engine: one typed seam instead of the whole runtime.

The stores embed through the engine's public ``submit`` (so the ledger sees
every embedding), quote before they queue, ask it which projects a caller
may act for, and keep their own tables in the service's one database.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from concurrent.futures import Future
from typing import Any, Protocol

from tpm_fed.catalog import ModelCatalog
from tpm_fed.federation import Federation
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import ServingRequest

class StoreEngine(Protocol):
    """The engine as the stores use it."""

    catalog: ModelCatalog
    federation: Federation
    ledger: Any  # tpm_fed.ledger.Ledger: its database engine and balances

    def submit(self, request: ServingRequest, identity: str | None = None, *,
               background: bool = False) -> Future: ...

    def burst(self) -> AbstractContextManager[None]: ...

    def quote(self, request: ServingRequest, identity: str | None = None) -> Quote: ...

    def project_for(self, identity: str, asked: str | None) -> str: ...

    def projects_of(self, identity: str) -> list[str]: ...
