"""``tpm status``: sites, replicas and the queue."""

from __future__ import annotations

import time

import click

from tpm_fed.federation import Federation
from tpm_fed.home import TpmHome
from tpm_fed.state import RequestLog


@click.command()
def status() -> None:
    """Show sites, the replicas they have run (warm or stopped) and queued requests."""
    home = TpmHome.default()
    home.ensure_embedded_default()
    federation = Federation.load(home.federation_file)
    log = RequestLog(home.database_url)
    queued = log.queued()
    click.echo(f"federation {federation.name!r} ({home.federation_file})")
    click.echo("sites:")
    for site in federation.sites:
        click.echo(f"  {site.name:<16} kind={site.kind:<8} workers={site.workers:<3} queued={queued.get(site.name, 0)}")
    replicas = log.replicas()
    click.echo("replicas:" if replicas else "replicas: none yet")
    now = time.time()
    for replica in replicas:
        click.echo(
            f"  {replica.state:<8} {replica.model}@{replica.version} on {replica.site}"
            f"  backend={replica.backend} served={replica.served_requests}"
            f"  last used {now - replica.last_used:.0f} s ago  ({replica.replica_id})"
        )
    log.close()
