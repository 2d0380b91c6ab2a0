"""``tpm login``, ``tpm logout`` and ``tpm functions``: Globus Compute credentials and function ids."""

from __future__ import annotations

import click

from tpm_fed.cli.admin import change_entry
from tpm_fed.cli.context import open_home
from tpm_fed.cli.tables import print_table


@click.command()
@click.option("--force", is_flag=True, help="Log in again even if the stored tokens are still good.")
def login(force: bool) -> None:
    """Log in to Globus Compute (the SDK's own flow; tokens are shared with it)."""
    from tpm_fed import globus_auth

    if not force and globus_auth.logged_in():
        click.echo("already logged in to Globus Compute (use --force to log in again)")
        return
    globus_auth.login(force=force)
    click.echo("logged in to Globus Compute")


@click.command()
def logout() -> None:
    """Revoke and forget this machine's Globus Compute tokens."""
    from tpm_fed import globus_auth

    globus_auth.logout()
    click.echo("logged out of Globus Compute")


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
    from tpm_fed.protocol.code_version import serving_code_version
    from tpm_fed.globus_auth import compute_client
    from tpm_fed.sites import registration

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
    from tpm_fed.protocol.entrypoints import SERVING_FUNCTIONS
    from tpm_fed.sites import registration

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
