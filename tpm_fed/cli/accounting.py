"""``tpm allocations`` and ``tpm usage``: balances and statements."""

from __future__ import annotations

import datetime as dt

import click

from tpm_fed.cli.context import open_ledger
from tpm_fed.cli.tables import print_table
from tpm_fed.ledger.ledger import format_su


@click.command()
@click.option("--project", default=None, help="Only this project.")
def allocations(project: str | None) -> None:
    """Service-unit balances per project and site: granted, spent, reserved, available."""
    ledger, _ = open_ledger()
    rows = ledger.balances(project)
    if not rows:
        click.echo("no allocations")
        return
    print_table(
        ["project", "site", "granted", "spent", "reserved", "available"],
        [(b.project, b.site, format_su(b.granted_usu), format_su(b.spent_usu), format_su(b.reserved_usu),
          format_su(b.available_usu)) for b in rows],
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
    ledger, _ = open_ledger()
    lines = ledger.statement(project, since_ts)
    total = sum(c.charged_usu for c in lines)
    print_table(
        ["request", "project", "site", "model@version", "kind", "in", "out", "state", "SU"],
        [(c.request_id, c.project, c.site, f"{c.model}@{c.version}", c.kind, c.prompt_tokens, c.completion_tokens,
          c.state, "free" if c.free else format_su(c.charged_usu)) for c in lines],
        right={"in", "out", "SU"},
    )
    click.echo(f"{len(lines)} requests, {format_su(total)} SU charged")
