"""The ``tpm`` command line.

Each command's module is imported only when that command runs (click's
lazy-loading pattern), so ``tpm submit`` pays for the HTTP client and the
request models, not for every other command's imports: a warm call's wall
time is mostly Python starting and these imports.
"""

from __future__ import annotations

import importlib

import click

from tpm_fed.protocol.errors import TpmError

COMMANDS = {
    "submit": "tpm_fed.cli.submit:submit",
    "trace": "tpm_fed.cli.trace:trace",
    "status": "tpm_fed.cli.status:status",
    "models": "tpm_fed.cli.models:models",
    "adapters": "tpm_fed.cli.adapters:adapters",
    "allocations": "tpm_fed.cli.accounting:allocations",
    "usage": "tpm_fed.cli.accounting:usage",
    "projects": "tpm_fed.cli.admin:projects",
    "sites": "tpm_fed.cli.admin:sites",
    "functions": "tpm_fed.cli.globus:functions",
    "login": "tpm_fed.cli.globus:login",
    "logout": "tpm_fed.cli.globus:logout",
    "serve": "tpm_fed.service.cli:serve",
    "service": "tpm_fed.cli.service:service",
    "slo": "tpm_fed.cli.slo:slo",
    "batch": "tpm_fed.cli.batch:batch",
    "stores": "tpm_fed.cli.stores:stores",
    "ask": "tpm_fed.cli.stores:ask",
}
"""Command name -> ``module:object``; a new command is one line here."""


class _TpmGroup(click.Group):
    """Loads commands on demand; turns our typed errors into one readable line and exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attribute = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

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
