"""``tpm adapters``: the registry of input modules and output heads (mode 2)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from pydantic import ValidationError

from tpm_fed.adapters import AdapterRegistry, Architecture
from tpm_fed.cli.context import open_home
from tpm_fed.cli.tables import print_table
from tpm_fed.protocol.errors import AdapterMismatch
from tpm_fed.protocol.requests import describe_validation_error


def _registry() -> AdapterRegistry:
    _, federation = open_home()
    return AdapterRegistry(federation.store / "adapters")


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
        architecture = Architecture.model_validate(json.loads(architecture_file.read_text()))
    except ValidationError as error:
        raise AdapterMismatch(f"{architecture_file}: {describe_validation_error(error)}") from None
    except ValueError as error:
        raise AdapterMismatch(f"{architecture_file}: not JSON: {error}") from None
    record = _registry().register(name, architecture, weights, description)
    click.echo(f"{record.ref}  {architecture.in_features} -> {architecture.out_features}")


@adapters.command("list")
def list_adapters() -> None:
    """Every registered adapter version, oldest first per name."""
    records = _registry().all()
    if not records:
        click.echo("no adapters registered (tpm adapters add NAME --architecture A.json --weights W.safetensors)")
        return
    print_table(
        ["adapter", "in", "out", "layers", "description"],
        [(r.ref, r.architecture.in_features, r.architecture.out_features,
          "+".join(layer.type for layer in r.architecture.layers), r.description) for r in records],
        right={"in", "out"},
    )
