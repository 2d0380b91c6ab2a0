"""What the ledger reads and writes: a reservation to make (:class:`Hold`), a statement's line
(:class:`Charge`), a balance, the error of a statement that changed the wrong rows; SUs as text."""

from __future__ import annotations

from dataclasses import dataclass

from tpm_fed.protocol.errors import TpmError
from tpm_fed.state.schema import MICRO

DEFAULT_HOLD_S = 3600.0
"""How long a reservation made without a deadline of its own may stay unsettled."""


class LedgerConflict(TpmError):
    """A ledger statement changed other rows than it must have (a missing allocation or charge row)."""


@dataclass(frozen=True)
class Balance:
    project: str
    site: str
    granted_usu: int
    spent_usu: int
    reserved_usu: int

    @property
    def available_usu(self) -> int:
        return self.granted_usu - self.spent_usu - self.reserved_usu


@dataclass(frozen=True)
class Charge:
    """One line of a usage statement."""

    request_id: str
    project: str
    site: str
    identity: str
    model: str
    version: str
    kind: str
    free: bool
    state: str
    estimate_usu: int
    charged_usu: int
    prompt_tokens: int
    completion_tokens: int
    activation_bytes: int
    cold_start: bool
    created_at: float
    note: str | None
    deadline: float | None = None
    holder: str | None = None


def format_su(usu: int) -> str:
    return f"{usu / MICRO:,.6f}"


@dataclass(frozen=True)
class Hold:
    """A reservation to make: ``estimate_usu`` for one request at one (project, site)."""

    request_id: str
    project: str
    site: str
    identity: str
    model: str
    version: str
    kind: str
    estimate_usu: int
    free: bool = False
    deadline: float | None = None
    """When the reservation falls in doubt (``time.time()``); None: the ledger's ``hold_s`` from now."""
