"""``tpm slo``: what the service measured against what its operator promised."""

from __future__ import annotations

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _verdict(row: dict) -> str:
    if row["met"] is None:
        return "no target" if row["target"] is None else "no requests"
    missed = [name for name, met in row["met"].items() if not met]
    return "met" if not missed else "missed: " + ", ".join(missed)


@click.command()
def slo() -> None:
    """Per request kind: p50/p95 latency and availability over the SLO window, against the targets."""
    with connect() as client:
        report = client.slo()
    click.echo(f"over the last {report['window_s']:g} s (since the service started, if later):")
    print_table(
        ["kind", "requests", "failed", "refused", "p50", "p95", "target p95", "availability", "target", "verdict"],
        [(row["kind"], row["requests"], row["failed"], row["refused"], _seconds(row["p50_s"]), _seconds(row["p95_s"]),
          _seconds(row["target"]["p95_latency_s"]) if row["target"] else None,
          None if row["availability"] is None else f"{row['availability']:.2%}",
          f"{row['target']['availability']:.2%}" if row["target"] else None, _verdict(row))
         for row in report["kinds"]],
        right={"requests", "failed", "refused", "p50", "p95", "target p95", "availability", "target"},
    )
