"""What the ``tpm`` commands open: the service they speak to, or (store commands) the home itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpm_fed.client import Client
from tpm_fed.connection import ensure_service
from tpm_fed.federation import Federation
from tpm_fed.home import TpmHome

if TYPE_CHECKING:
    from tpm_fed.client import Client


def connect() -> Client:
    """The service: ``TPM_URL``/``TPM_TOKEN``, else the home's own (started in the background if need be).

    Every command that reads or changes the federation's state goes through
    it, so it sees the service's one ledger and its running replicas, and
    works the same against a research center's shared service.
    """
    return Client(progress=True, connections=4)


def connect_home(home: TpmHome) -> Client:
    """The home's own service, whatever ``TPM_URL`` says (for what changes the home's own files)."""
    address = ensure_service(home, announce=True)
    return Client(address.url, address.token, connections=4)


def open_home() -> tuple[TpmHome, Federation]:
    """The home and its federation file, read here (the model store's commands work on the home's files)."""
    home = TpmHome.default()
    home.ensure_embedded_default()
    return home, Federation.load(home.federation_file)
