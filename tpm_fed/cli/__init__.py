"""The ``tpm`` command line."""

from __future__ import annotations

import click

from tpm_fed.protocol.errors import TpmError


class _TpmGroup(click.Group):
    """Turns our typed errors into one readable line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TpmError as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from None


@click.group(cls=_TpmGroup)
@click.version_option(package_name="tpm-fed")
def main() -> None:
    """tpm-fed: use large AI models hosted across research computing sites.

    State lives in $TPM_HOME (default ~/.tpm); the first command creates the
    embedded default there: one local site and a small demo model.
    """


def _register() -> None:
    from tpm_fed.cli.accounting import allocations, usage
    from tpm_fed.cli.adapters import adapters
    from tpm_fed.cli.admin import projects, sites
    from tpm_fed.cli.globus import functions, login, logout
    from tpm_fed.cli.models import models
    from tpm_fed.cli.service import service
    from tpm_fed.cli.status import status
    from tpm_fed.cli.submit import submit
    from tpm_fed.cli.trace import trace
    from tpm_fed.service.cli import serve

    for command in (submit, trace, status, models, adapters, allocations, usage, projects, sites,
                    functions, login, logout, serve, service):
        main.add_command(command)


_register()
