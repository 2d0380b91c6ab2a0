"""``tpm projects ...`` and ``tpm sites ...``: operator changes to the federation file.

Each change loads the file, applies the change, validates the whole
federation again and writes it atomically, so a mistake is refused with
the field named and the file is never left half-written.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from tpm_fed.cli.context import open_home
from tpm_fed.cli.tables import print_table
from tpm_fed.protocol.errors import FederationConfigError
from tpm_fed.federation import Federation, ProjectConfig, SiteConfig
from tpm_fed.protocol.requests import describe_validation_error


def add_entry(home, federation: Federation, collection: str, entry: dict) -> None:
    """Append ``entry`` to ``collection`` (``sites``, ``models`` or ``projects``); validate, write."""
    _save(home, federation, collection, lambda entries: [*entries, entry])


def change_entry(home, federation: Federation, collection: str, name: str, change: Callable[[dict], dict]) -> None:
    """Replace the entry ``name`` of ``collection`` with ``change(entry)``; validate, write."""
    _save(home, federation, collection, lambda entries: [change(e) if e["name"] == name else e for e in entries])


def _save(home, federation: Federation, collection: str, edit: Callable[[list[dict]], list[dict]]) -> None:
    """Edit one list of the federation, validate the whole again, write it atomically."""
    from pydantic import ValidationError

    raw = federation.model_dump(mode="json")
    raw[collection] = edit(raw[collection])
    try:
        updated = Federation.model_validate(raw)
    except ValidationError as error:
        raise FederationConfigError(describe_validation_error(error)) from None
    updated.dump(home.federation_file)
    _restart_service(home)


def _restart_service(home) -> None:
    """The home's service read the old file: stop it (requests in flight finish); the next call starts anew."""
    import os
    import signal

    from tpm_fed.connection import running_service

    address = running_service(home)
    if address is not None and address.pid is not None:
        os.kill(address.pid, signal.SIGTERM)
        click.echo("tpm: the home's service stops to take the change; the next request starts it again", err=True)


@click.group()
def projects() -> None:
    """List projects, or change members and grants (operator)."""


@projects.command("list")
def list_projects() -> None:
    _, federation = open_home()
    print_table(
        ["project", "members", "grants"],
        [(p.name, ", ".join(p.members) or "none",
          ", ".join(f"{site}={su:g}" for site, su in p.allocations.items()) or "none") for p in federation.projects],
    )


@projects.command("add")
@click.argument("name")
@click.option("--member", "members", multiple=True, help="An identity (repeatable).")
def add_project(name: str, members: tuple[str, ...]) -> None:
    """Create project NAME."""
    home, federation = open_home()
    project = ProjectConfig(name=name, members=list(members))
    add_entry(home, federation, "projects", project.model_dump(mode="json"))
    click.echo(f"project {name!r} added")


@projects.command("add-member")
@click.argument("project")
@click.argument("identity")
def add_member(project: str, identity: str) -> None:
    """Add IDENTITY to PROJECT."""
    home, federation = open_home()
    federation.project(project)
    change_entry(home, federation, "projects", project, lambda p: {**p, "members": sorted({*p["members"], identity})})
    click.echo(f"{identity!r} is now a member of {project!r}")


@projects.command("grant")
@click.argument("project")
@click.argument("site")
@click.argument("service_units", type=float)
def grant(project: str, site: str, service_units: float) -> None:
    """Add SERVICE_UNITS to PROJECT's allocation at SITE (negative to take back)."""
    home, federation = open_home()
    federation.project(project)
    federation.site(site)

    def add_units(p: dict) -> dict:
        return {**p, "allocations": {**p["allocations"], site: p["allocations"].get(site, 0.0) + service_units}}

    change_entry(home, federation, "projects", project, add_units)
    click.echo(f"{project!r} at {site!r}: granted {service_units:+g} SU")


@click.group()
def sites() -> None:
    """List sites, or add one (local, a Globus Compute endpoint, or an endpoint config run here)."""


@sites.command("list")
def list_sites() -> None:
    _, federation = open_home()
    print_table(
        ["site", "billing", "owner", "access", "location", "max replicas", "keep alive"],
        [(s.name, s.billing, s.owner, s.access, s.location, s.capacity.max_replicas, f"{s.keep_alive_s:g} s")
         for s in federation.sites],
        right={"max replicas", "keep alive"},
    )


def _json_option(text: str | None, option: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise click.UsageError(f"{option}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise click.UsageError(f"{option}: expected a JSON object")
    return value


@sites.command("add")
@click.argument("name")
@click.option("--byo", is_flag=True, help="A project's own compute: free for it, closed to others.")
@click.option("--project", default=None, help="The owning project (with --byo).")
@click.option("--location", default="local", show_default=True)
@click.option("--max-replicas", type=int, default=1, show_default=True)
@click.option("--keep-alive", "keep_alive_s", type=float, default=600.0, show_default=True)
@click.option("--endpoint", "endpoint_id", default=None,
              help="A Globus Compute endpoint id: the site is reached through the service.")
@click.option("--user-endpoint-config", default=None,
              help="JSON for a multi-user endpoint's template (account, partition, walltime...).")
@click.option("--resource-specification", default=None, help="JSON resources for each task.")
@click.option("--engine-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An endpoint config YAML whose engine this process runs (Slurm, PBS...), no cloud hop.")
def add_site(name, byo, project, location, max_replicas, keep_alive_s, endpoint_id, user_endpoint_config,
             resource_specification, engine_config) -> None:
    """Add site NAME: the local engine, a Globus Compute endpoint, or an endpoint config's engine."""
    from pathlib import Path

    from pydantic import ValidationError

    home, federation = open_home()
    if byo and project is None:
        raise click.UsageError("--byo needs --project (the project that owns the compute)")
    if project is not None and not byo:
        raise click.UsageError("--project names the owner of a --byo site")
    if endpoint_id is not None and engine_config is not None:
        raise click.UsageError("--endpoint and --engine-config are two ways to reach a site: choose one")
    access = "globus-compute" if endpoint_id else "parsl" if engine_config else "local"
    remote = {
        "endpoint_id": endpoint_id,
        "user_endpoint_config": _json_option(user_endpoint_config, "--user-endpoint-config"),
        "resource_specification": _json_option(resource_specification, "--resource-specification"),
        "engine_config": Path(engine_config).resolve() if engine_config else None,
    }
    try:
        site = SiteConfig(name=name, billing="byo" if byo else "rcc", owner=project, location=location, access=access,
                          capacity={"max_replicas": max_replicas}, keep_alive_s=keep_alive_s,
                          **{k: v for k, v in remote.items() if v is not None})
    except ValidationError as error:
        raise FederationConfigError(describe_validation_error(error)) from None
    if engine_config:
        from tpm_fed.sites.parsl_engine import load_engine_config

        load_engine_config(Path(engine_config)).engine.shutdown()  # the endpoint loader's verdict, now
    add_entry(home, federation, "sites", site.model_dump(mode="json"))
    click.echo(f"site {name!r} added ({site.billing}{', owned by ' + project if project else ''}, "
               f"access {access})")
    if access == "globus-compute":
        click.echo(f"next: `tpm functions register --site {name}` (after `tpm login`)")
