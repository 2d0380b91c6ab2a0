"""What the ``tpm`` commands open: the home, its federation and database."""

from __future__ import annotations

from tpm_fed.federation import Federation
from tpm_fed.home import TpmHome
from tpm_fed.ledger import Ledger
from tpm_fed.state import open_database


def open_home() -> tuple[TpmHome, Federation]:
    home = TpmHome.default()
    home.ensure_embedded_default()
    return home, Federation.load(home.federation_file)


def open_ledger() -> tuple[Ledger, Federation]:
    """The ledger, with grants synced from the federation file."""
    home, federation = open_home()
    ledger = Ledger(open_database(home.database_url))
    ledger.sync_grants({(p.name, s): a for p in federation.projects for s, a in p.allocations.items()})
    return ledger, federation
