"""``tpm login``, ``tpm logout`` and ``tpm functions``: Globus credentials and function ids.

``tpm login`` logs in to the tpm service the client targets when that
service takes Globus Auth identities (``--service URL``, else ``TPM_URL``):
a token for the service's own scope (see :mod:`tpm_fed.service_login`).
``tpm login --compute`` (and plain ``tpm login`` with no service to target)
logs in to Globus Compute itself, with the SDK's own flow: for sites a user
brings (byo) and for operators registering the serving function.
"""

from __future__ import annotations

import os

import click

from tpm_fed import globus_auth
from tpm_fed.cli.admin import change_entry
from tpm_fed.cli.context import open_home
from tpm_fed.cli.tables import print_table
from tpm_fed.globus_auth import compute_client
from tpm_fed.home import TpmHome
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.entrypoints import SERVING_FUNCTIONS
from tpm_fed.service_login import ServiceLogin, discover, login_folder
from tpm_fed.sites import registration


_SERVICE = click.option("--service", "service_url", metavar="URL",
                        help="The tpm service to log in to (default: TPM_URL).")
_COMPUTE = click.option("--compute", is_flag=True,
                        help="Globus Compute itself (byo sites, registering functions), not a tpm service.")


@click.command()
@_SERVICE
@_COMPUTE
@click.option("--force", is_flag=True, help="Log in again even if the stored tokens are still good.")
def login(service_url: str | None, compute: bool, force: bool) -> None:
    """Log in to a tpm service with Globus Auth (its own scope), or to Globus Compute (--compute)."""
    url = None if compute else service_url or os.environ.get("TPM_URL")
    if url is None:
        _compute_login(force)
        return
    service = ServiceLogin(discover(url), login_folder(TpmHome.default(), url))
    if not force and service.logged_in():
        click.echo(f"already logged in to {service.settings.url} (use --force to log in again)")
        return
    service.login(force=force)
    click.echo(f"logged in to {service.settings.url}")


def _compute_login(force: bool) -> None:
    if not force and globus_auth.logged_in():
        click.echo("already logged in to Globus Compute (use --force to log in again)")
        return
    globus_auth.login(force=force)
    click.echo("logged in to Globus Compute")


@click.command()
@_SERVICE
@_COMPUTE
def logout(service_url: str | None, compute: bool) -> None:
    """Revoke and forget the tokens for a tpm service (default: TPM_URL), or for Globus Compute (--compute)."""
    url = None if compute else service_url or os.environ.get("TPM_URL")
    if url is None:
        globus_auth.logout()
        click.echo("logged out of Globus Compute")
        return
    service = ServiceLogin.stored(TpmHome.default(), url)
    if service is None:
        click.echo(f"not logged in to {url.rstrip('/')}")
        return
    service.logout()
    click.echo(f"logged out of {service.settings.url}")


@click.group()
def functions() -> None:
    """Register the serving function with Globus Compute, per site."""


@functions.command("register")
@click.option("--site", "site_name", required=True, help="A globus-compute site of the federation.")
@click.option("--force", is_flag=True, help="Register anew even if the recorded id is for this code.")
def register_functions(site_name: str, force: bool) -> None:
    """Register the serving function for SITE and record its id in the federation file.

    An id is reused while the serving code is unchanged; changed code is registered anew.
    """
    home, federation = open_home()
    site = federation.site(site_name)
    if site.access != "globus-compute":
        raise click.UsageError(f"site {site_name!r} is reached by {site.access!r}, not Globus Compute: "
                               "there is nothing to register")
    stale = set(registration.stale_functions(site))
    if not stale and not force:
        click.echo(f"{site_name}: up to date (serving code {serving_code_version()})")
        return
    table, registered_now = registration.register(compute_client(), site, force=force)
    recorded = {name: f.model_dump(mode="json") for name, f in table.items()}
    change_entry(home, federation, "sites", site_name, lambda entry: {**entry, "functions": recorded})
    for name, registered in table.items():
        fresh = "registered" if name in registered_now else "kept"
        click.echo(f"{site_name}: {name} {fresh} as {registered.function_id} "
                   f"(serving code {registered.code_version})")
    click.echo("If the endpoint restricts allowed_functions, add these ids to its config.yaml.")


@functions.command("list")
def list_functions() -> None:
    """The recorded function ids of every Globus Compute site, and whether they are current."""
    _, federation = open_home()
    rows = []
    for site in federation.sites:
        if site.access != "globus-compute":
            continue
        stale = set(registration.stale_functions(site))
        for name in SERVING_FUNCTIONS:
            recorded = site.functions.get(name)
            if recorded is None:
                rows.append((site.name, name, None, None, "not registered"))
            else:
                state = "stale: register again" if name in stale else "current"
                rows.append((site.name, name, recorded.function_id, recorded.code_version, state))
    print_table(["site", "function", "function id", "code", "state"], rows)
