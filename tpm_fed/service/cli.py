"""The ``tpm serve`` command (also ``python -m tpm_fed.service``)."""

from __future__ import annotations

from pathlib import Path

import click

from tpm_fed.home import TpmHome
from tpm_fed.protocol.errors import TpmError


@click.command("serve")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The tpm home to serve ($TPM_HOME or ~/.tpm by default).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=0, show_default=True, help="TCP port (0: any free port).")
@click.option("--database-url", default=None,
              help="SQLAlchemy URL of the ledger, e.g. postgresql+psycopg://tpm@db/tpm (the home's SQLite by default).")
@click.option("--auth", type=click.Choice(["local", "globus"]), default="local", show_default=True,
              help="local: a token in $TPM_HOME/service.json; globus: Globus Auth access tokens "
                   "(TPM_SERVICE_CLIENT_ID and TPM_SERVICE_CLIENT_SECRET name the service's client).")
@click.option("--idle-timeout", type=float, default=None,
              help="Stop after this many seconds without a request (default: never).")
@click.option("--operator", "operators", multiple=True, help="An identity that may read every project and use /tpm/v1/admin "
              "(repeatable; with --auth local the home's owner is one).")
def serve(home, host, port, database_url, auth, idle_timeout, operators) -> None:
    """Run the federation as a service: OpenAI-compatible HTTP under /v1, tpm-fed's own under /tpm/v1."""
    from tpm_fed.service.server import ServiceOptions, run_service

    if host not in ("127.0.0.1", "localhost", "::1") and auth == "local":
        raise click.UsageError("--auth local serves the home's owner only: listen on loopback, "
                               "or use --auth globus for a shared deployment")
    tpm_home = TpmHome(home.expanduser().resolve()) if home else TpmHome.default()
    try:
        run_service(tpm_home, ServiceOptions(host=host, port=port, database_url=database_url, auth=auth,
                                             idle_timeout_s=idle_timeout, operators=tuple(operators)))
    except TpmError as error:  # one line, also when started as python -m tpm_fed.service (no tpm group)
        raise click.ClickException(f"{type(error).__name__}: {error}") from None
