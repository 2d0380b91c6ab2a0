"""``tpm status``: sites and their live replicas, as the service running them sees them."""

from __future__ import annotations

import time

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table


@click.command()
def status() -> None:
    """Show sites (state, billing, running tasks) and their live replicas (warm, starting) with queues."""
    with connect() as client:
        report = client.sites()
        url = client.url
    click.echo(f"service {url}")
    click.echo("sites:")
    print_table(
        ["site", "state", "billing", "owner", "access", "location", "max replicas", "tasks"],
        [(s["name"], s["state"], s.get("billing"), s.get("owner"), s["access"], s.get("location"),
          s.get("max_replicas", s["workers"]), s["outstanding_tasks"]) for s in report["sites"]],
        right={"max replicas", "tasks"}, indent=2,
    )
    replicas = report["replicas"]
    click.echo("replicas (the service keeps them warm between calls):" if replicas else "replicas: none live")
    now = time.time()
    print_table(
        ["state", "replica", "queue", "service", "last used"],
        [(r["state"], r["replica_id"], r["queue_depth"], f"~{r['service_s']:.2f} s", f"{now - r['last_used']:.0f} s ago")
         for r in sorted(replicas, key=lambda r: -r["last_used"])],
        right={"queue", "service", "last used"}, indent=2,
    )
