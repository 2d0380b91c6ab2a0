"""``tpm models``: the models a federation serves."""

from __future__ import annotations

import click

from tpm_fed.catalog import ModelCatalog
from tpm_fed.errors import TpmError
from tpm_fed.federation import Federation
from tpm_fed.home import TpmHome
from tpm_fed.request import ModelRef


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List models with their current version id, backend and context length."""
    if ctx.invoked_subcommand is not None:
        return
    home = TpmHome.default()
    home.ensure_embedded_default()
    catalog = ModelCatalog(Federation.load(home.federation_file))
    for config in catalog.federation.models:
        try:
            resolved = catalog.resolve(ModelRef(name=config.name))
            detail = f"{resolved.spec.version}  context={resolved.context_length}"
        except TpmError as error:
            detail = f"unavailable: {error}"
        click.echo(f"{config.name:<20} {detail}  backend={config.backend} dtype={config.dtype}  {config.path}")
