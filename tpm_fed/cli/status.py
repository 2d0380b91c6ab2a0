"""``tpm status``: sites, replicas and the queue."""

from __future__ import annotations

import time

import click

from tpm_fed.broker import ReplicaRegistry
from tpm_fed.cli.context import open_home
from tpm_fed.cli.tables import print_table
from tpm_fed.state import RequestLog, open_database


@click.command()
def status() -> None:
    """Show sites, the replicas placed on them (warm, starting, stopped) and queued requests."""
    home, federation = open_home()
    database = open_database(home.database_url)
    queued = RequestLog(database).queued()
    replicas = ReplicaRegistry(database).recorded()
    click.echo(f"federation {federation.name!r} ({home.federation_file})")
    click.echo("sites:")
    print_table(
        ["site", "billing", "owner", "access", "location", "max replicas", "queued"],
        [(site.name, site.billing, site.owner, site.access, site.location, site.capacity.max_replicas,
          queued.get(site.name, 0)) for site in federation.sites],
        right={"max replicas", "queued"}, indent=2,
    )
    click.echo("replicas (each `tpm submit` starts and stops its own; a Client keeps them warm):"
               if replicas else "replicas: none yet")
    now = time.time()
    print_table(
        ["state", "replica", "queue", "service", "last used"],
        [(r.state, r.replica_id, r.queue_depth, f"~{r.service_s:.2f} s", f"{now - r.last_used:.0f} s ago")
         for r in sorted(replicas, key=lambda r: -r.last_used)],
        right={"queue", "service", "last used"}, indent=2,
    )
