"""``tpm allocations`` and ``tpm usage``: balances and statements, from the service's one ledger.

A member sees their own projects; an operator sees every project.
"""

from __future__ import annotations

import datetime as dt

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import format_su, print_table


@click.command()
@click.option("--project", default=None, help="Only this project.")
def allocations(project: str | None) -> None:
    """Service-unit balances per project and site: granted, spent, reserved, available."""
    with connect() as client:
        rows = client.allocations(project)
    if not rows:
        click.echo("no allocations")
        return
    print_table(
        ["project", "site", "granted", "spent", "reserved", "available"],
        [(b["project"], b["site"], format_su(b["granted_su"]), format_su(b["spent_su"]), format_su(b["reserved_su"]),
          format_su(b["available_su"])) for b in rows],
        right={"granted", "spent", "reserved", "available"},
    )


@click.command()
@click.option("--project", default=None, help="Only this project.")
@click.option("--since", default=None, help="Only requests since this ISO date or time (e.g. 2026-11-25).")
def usage(project: str | None, since: str | None) -> None:
    """A statement: request, model@version, kind, tokens, SUs charged."""
    since_ts = None
    if since is not None:
        try:
            since_ts = dt.datetime.fromisoformat(since).timestamp()
        except ValueError:
            raise click.BadParameter(f"{since!r} is not an ISO date or time", param_hint="--since") from None
    with connect() as client:
        lines = client.usage(project, since_ts)
    print_table(
        ["request", "project", "site", "model@version", "kind", "in", "out", "state", "SU"],
        [(c["request_id"], c["project"], c["site"], f"{c['model']}@{c['version']}", c["kind"], c["prompt_tokens"],
          c["completion_tokens"], c["state"] + (" (in doubt)" if c.get("in_doubt") else ""),
          "free" if c["free"] else format_su(c["charged_su"])) for c in lines],
        right={"in", "out", "SU"},
    )
    click.echo(f"{len(lines)} requests, {format_su(sum(c['charged_su'] for c in lines))} SU charged")
    if doubtful := sum(1 for c in lines if c.get("in_doubt")):
        # Held past their deadline, or by a service that stopped: the sweeper settles or releases them.
        click.echo(f"{doubtful} reservations in doubt (the service settles them from its request log, or releases them)")
