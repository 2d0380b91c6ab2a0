"""``tpm adapters``: the service's registry of input modules and output heads (mode 2).

The architecture file and the weights are read here and uploaded; the
service checks that the weights are safetensors and fit the architecture
before registering them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table
from tpm_fed.protocol.adapter_architecture import Architecture


@click.group()
def adapters() -> None:
    """Register and list adapters (allow-listed architectures, safetensors weights)."""


@adapters.command("add")
@click.argument("name")
@click.option("--architecture", "architecture_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSON: {"layers": [{"type": "linear", "in_features": 6, "out_features": 128}, ...]}')
@click.option("--weights", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A .safetensors file with nn.Sequential names (0.weight, 0.bias, ...).")
@click.option("--description", default="", help="What it maps from and to.")
def add(name: str, architecture_file: Path, weights: Path, description: str) -> None:
    """Register WEIGHTS under NAME; prints the version id."""
    try:
        architecture = json.loads(architecture_file.read_text())
    except ValueError as error:
        raise click.ClickException(f"AdapterMismatch: {architecture_file}: not JSON: {error}") from None
    with connect() as client:
        record = client.admin.register_adapter(name, architecture, weights.read_bytes(), description)
    layers = Architecture.model_validate(record["architecture"])
    click.echo(f"{record['ref']}  {layers.in_features} -> {layers.out_features}")


@adapters.command("list")
def list_adapters() -> None:
    """Every registered adapter version, oldest first per name."""
    with connect() as client:
        records = client.admin.adapters()
    if not records:
        click.echo("no adapters registered (tpm adapters add NAME --architecture A.json --weights W.safetensors)")
        return
    rows = []
    for record in records:
        architecture = Architecture.model_validate(record["architecture"])
        rows.append((record["ref"], architecture.in_features, architecture.out_features,
                     "+".join(layer.type for layer in architecture.layers), record["description"]))
    print_table(["adapter", "in", "out", "layers", "description"], rows, right={"in", "out"})
