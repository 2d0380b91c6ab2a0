"""``tpm allocations`` and ``tpm usage``: balances and statements."""

from __future__ import annotations

import datetime as dt

import click

from tpm_fed.cli.context import open_ledger
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
    click.echo(f"{'project':<16} {'site':<16} {'granted':>16} {'spent':>16} {'reserved':>16} {'available':>16}")
    for b in rows:
        click.echo(f"{b.project:<16} {b.site:<16} {format_su(b.granted_usu):>16} {format_su(b.spent_usu):>16} "
                   f"{format_su(b.reserved_usu):>16} {format_su(b.available_usu):>16}")


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
    click.echo(f"{'request':<34} {'project':<12} {'site':<10} {'model@version':<36} {'kind':<8} "
               f"{'in':>6} {'out':>6} {'state':<9} {'SU':>12}")
    for c in lines:
        su = "free" if c.free else format_su(c.charged_usu)
        click.echo(f"{c.request_id:<34} {c.project:<12} {c.site:<10} {c.model + '@' + c.version:<36} {c.kind:<8} "
                   f"{c.prompt_tokens:>6} {c.completion_tokens:>6} {c.state:<9} {su:>12}")
    click.echo(f"{len(lines)} requests, {format_su(total)} SU charged")
