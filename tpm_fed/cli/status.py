"""``tpm status``: sites and their live replicas, as the service running them sees them."""

from __future__ import annotations

import time

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table


@click.command()
@click.argument("request_id", required=False)
def status(request_id: str | None) -> None:
    """Show sites (state, billing, running tasks) and their live replicas (warm, starting) with queues.

    With REQUEST_ID: that request's status; while it waits, its place in the
    queue and when it should start.
    """
    if request_id is not None:
        _request_status(request_id)
        return
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


def _request_status(request_id: str) -> None:
    with connect() as client:
        record = client.request(request_id)
    if record["status"] == "waiting":
        click.echo(f"{request_id}: waiting for replica {record['replica']} on {record['site']}, "
                   f"place {record['queue_position']} in its queue, "
                   f"starts in about {record['estimated_start_s']:.1f} s")
        return
    line = f"{request_id}: {record['status']} | {record['model']}@{record['version']} | {record['kind']} on " \
           f"{record['site']} | charge {record['charge_state']}: {record['charged_su']:.6f} SU to {record['project']}"
    click.echo(line + (f" | error: {record['error']}" if record.get("error") else ""))
