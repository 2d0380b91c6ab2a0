"""``tpm status``: sites, replicas and the queue."""

from __future__ import annotations

import time

import click

from tpm_fed.federation import Federation
from tpm_fed.home import TpmHome
from tpm_fed.broker import ReplicaRegistry
from tpm_fed.state import RequestLog, open_database


@click.command()
def status() -> None:
    """Show sites, the replicas placed on them (warm, starting, stopped) and queued requests."""
    home = TpmHome.default()
    home.ensure_embedded_default()
    federation = Federation.load(home.federation_file)
    database = open_database(home.database_url)
    queued = RequestLog(database).queued()
    replicas = ReplicaRegistry(database).recorded()
    click.echo(f"federation {federation.name!r} ({home.federation_file})")
    click.echo("sites:")
    for site in federation.sites:
        owner = f" owner={site.owner}" if site.owner else ""
        click.echo(
            f"  {site.name:<16} {site.billing}{owner} access={site.access} location={site.location}"
            f" replicas<={site.capacity.max_replicas} queued={queued.get(site.name, 0)}"
        )
    click.echo("replicas (each `tpm submit` starts and stops its own; a Client keeps them warm):"
               if replicas else "replicas: none yet")
    now = time.time()
    for replica in sorted(replicas, key=lambda r: -r.last_used):
        click.echo(
            f"  {replica.state:<9} {replica.replica_id}  queue={replica.queue_depth}"
            f"  service~{replica.service_s:.2f} s  last used {now - replica.last_used:.0f} s ago"
        )
