"""``tpm projects ...`` and ``tpm sites ...``: operator changes, made by the service while it serves.

Each command calls the service's operator routes (``/tpm/v1/admin``), so it
works the same on the home's own service and on a shared one (``TPM_URL``).
The service validates the whole federation again, writes its file
atomically and adopts the change at once: running sites keep their warm
replicas, and a new member can spend on their next request. A mistake is
refused with the field named, and nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table


def change_entry(home: Any, federation: Any, collection: str, name: str,
                 change: Callable[[dict], dict]) -> None:
    """Replace site ``name`` with ``change(its entry)`` through the service (``tpm functions register``).

    ``home`` and ``federation`` are not read: the service's federation is the record.
    """
    if collection != "sites":
        raise ValueError(f"only sites are changed this way, not {collection}")
    with connect() as client:
        current = next((site for site in client.admin.sites() if site["name"] == name), None)
        if current is None:
            raise click.ClickException(f"the service has no site {name!r}")
        client.admin.replace_site(name, change(current))


@click.group()
def projects() -> None:
    """List projects, or change members and grants (operator)."""


@projects.command("list")
def list_projects() -> None:
    with connect() as client:
        listed = client.admin.projects()
    print_table(
        ["project", "members", "grants"],
        [(p["name"], ", ".join(p["members"]) or "none",
          ", ".join(f"{site}={su:g}" for site, su in p["allocations"].items()) or "none") for p in listed],
    )


@projects.command("add")
@click.argument("name")
@click.option("--member", "members", multiple=True, help="An identity (repeatable).")
def add_project(name: str, members: tuple[str, ...]) -> None:
    """Create project NAME."""
    with connect() as client:
        client.admin.add_project(name, members)
    click.echo(f"project {name!r} added")


@projects.command("remove")
@click.argument("name")
def remove_project(name: str) -> None:
    """Remove project NAME: its members can no longer spend; requests it placed finish, its statement stays."""
    with connect() as client:
        client.admin.remove_project(name)
    click.echo(f"project {name!r} removed")


@projects.command("add-member")
@click.argument("project")
@click.argument("identity")
def add_member(project: str, identity: str) -> None:
    """Add IDENTITY to PROJECT (they can spend its SUs on their next request)."""
    with connect() as client:
        client.admin.add_member(project, identity)
    click.echo(f"{identity!r} is now a member of {project!r}")


@projects.command("remove-member")
@click.argument("project")
@click.argument("identity")
def remove_member(project: str, identity: str) -> None:
    """Remove IDENTITY from PROJECT (requests already placed still finish)."""
    with connect() as client:
        client.admin.remove_member(project, identity)
    click.echo(f"{identity!r} is no longer a member of {project!r}")


@projects.command("grant")
@click.argument("project")
@click.argument("site")
@click.argument("service_units", type=float)
def grant(project: str, site: str, service_units: float) -> None:
    """Add SERVICE_UNITS to PROJECT's allocation at SITE (negative to take back)."""
    with connect() as client:
        client.admin.grant(project, site, service_units)
    click.echo(f"{project!r} at {site!r}: granted {service_units:+g} SU")


@click.group()
def sites() -> None:
    """List sites, or add or remove one (local, a Globus Compute endpoint, or an endpoint config run there)."""


@sites.command("list")
def list_sites() -> None:
    with connect() as client:
        report = client.sites()
    print_table(
        ["site", "billing", "owner", "access", "location", "max replicas", "keep alive", "state"],
        [(s["name"], s.get("billing"), s.get("owner"), s["access"], s.get("location"), s.get("max_replicas"),
          f"{s.get('keep_alive_s', 0):g} s", s["state"]) for s in report["sites"]],
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
@click.option("--engine-config", default=None,
              help="An endpoint config YAML (on the service's machine) whose engine the service runs "
                   "(Slurm, PBS...), no cloud hop.")
def add_site(name, byo, project, location, max_replicas, keep_alive_s, endpoint_id, user_endpoint_config,
             resource_specification, engine_config) -> None:
    """Add site NAME: the local engine, a Globus Compute endpoint, or an endpoint config's engine."""
    if byo and project is None:
        raise click.UsageError("--byo needs --project (the project that owns the compute)")
    if project is not None and not byo:
        raise click.UsageError("--project names the owner of a --byo site")
    if endpoint_id is not None and engine_config is not None:
        raise click.UsageError("--endpoint and --engine-config are two ways to reach a site: choose one")
    access = "globus-compute" if endpoint_id else "parsl" if engine_config else "local"
    config = {
        "name": name, "billing": "byo" if byo else "rcc", "owner": project, "location": location, "access": access,
        "capacity": {"max_replicas": max_replicas}, "keep_alive_s": keep_alive_s,
        "endpoint_id": endpoint_id,
        "user_endpoint_config": _json_option(user_endpoint_config, "--user-endpoint-config"),
        "resource_specification": _json_option(resource_specification, "--resource-specification"),
        "engine_config": str(Path(engine_config).resolve()) if engine_config else None,
    }
    with connect() as client:  # the service checks it as the federation file's loader does, and an engine config loads
        client.admin.add_site({key: value for key, value in config.items() if value is not None})
    click.echo(f"site {name!r} added ({config['billing']}{', owned by ' + project if project else ''}, "
               f"access {access})")
    if access == "globus-compute":
        click.echo(f"next: `tpm functions register --site {name}` (after `tpm login`)")


@sites.command("remove")
@click.argument("name")
def remove_site(name: str) -> None:
    """Remove site NAME: it drains (the requests it has finish, no new ones reach it), then stops.

    Refused while a grant or a model's site list names it: take those back first.
    """
    with connect() as client:
        client.admin.remove_site(name)
    click.echo(f"site {name!r} removed (its replicas stop once their requests are done)")
