"""``tpm projects ...`` and ``tpm sites ...``: operator changes to the federation file.

Each change loads the file, applies the change, validates the whole
federation again and writes it atomically, so a mistake is refused with
the field named and the file is never left half-written.
"""

from __future__ import annotations

import click

from tpm_fed.cli.context import open_home
from tpm_fed.errors import FederationConfigError
from tpm_fed.federation import Federation, ProjectConfig, SiteConfig
from tpm_fed.request import describe_validation_error


def _save(home, federation: Federation, change: dict) -> None:
    from pydantic import ValidationError

    raw = federation.model_dump(mode="json")
    raw.update(change)
    try:
        updated = Federation.model_validate(raw)
    except ValidationError as error:
        raise FederationConfigError(describe_validation_error(error)) from None
    updated.dump(home.federation_file)


@click.group()
def projects() -> None:
    """List projects, or change members and grants (operator)."""


@projects.command("list")
def list_projects() -> None:
    _, federation = open_home()
    for p in federation.projects:
        grants = ", ".join(f"{site}={su:g}" for site, su in p.allocations.items()) or "none"
        click.echo(f"{p.name:<16} members: {', '.join(p.members) or 'none'}  grants: {grants}")


@projects.command("add")
@click.argument("name")
@click.option("--member", "members", multiple=True, help="An identity (repeatable).")
def add_project(name: str, members: tuple[str, ...]) -> None:
    """Create project NAME."""
    home, federation = open_home()
    project = ProjectConfig(name=name, members=list(members))
    _save(home, federation, {"projects": [*federation.model_dump(mode="json")["projects"], project.model_dump(mode="json")]})
    click.echo(f"project {name!r} added")


@projects.command("add-member")
@click.argument("project")
@click.argument("identity")
def add_member(project: str, identity: str) -> None:
    """Add IDENTITY to PROJECT."""
    home, federation = open_home()
    federation.project(project)
    updated = [
        {**p, "members": sorted({*p["members"], identity})} if p["name"] == project else p
        for p in federation.model_dump(mode="json")["projects"]
    ]
    _save(home, federation, {"projects": updated})
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
    updated = []
    for p in federation.model_dump(mode="json")["projects"]:
        if p["name"] == project:
            allocations = dict(p["allocations"])
            allocations[site] = allocations.get(site, 0.0) + service_units
            p = {**p, "allocations": allocations}
        updated.append(p)
    _save(home, federation, {"projects": updated})
    click.echo(f"{project!r} at {site!r}: granted {service_units:+g} SU")


@click.group()
def sites() -> None:
    """List sites, or add one (a project's own compute with --byo)."""


@sites.command("list")
def list_sites() -> None:
    _, federation = open_home()
    for s in federation.sites:
        owner = f" owner={s.owner}" if s.owner else ""
        click.echo(f"{s.name:<16} {s.kind}{owner} access={s.access} location={s.location} "
                   f"max_replicas={s.capacity.max_replicas} keep_alive={s.keep_alive_s:g}s")


@sites.command("add")
@click.argument("name")
@click.option("--byo", is_flag=True, help="A project's own compute: free for it, closed to others.")
@click.option("--project", default=None, help="The owning project (with --byo).")
@click.option("--location", default="local", show_default=True)
@click.option("--max-replicas", type=int, default=1, show_default=True)
@click.option("--keep-alive", "keep_alive_s", type=float, default=600.0, show_default=True)
def add_site(name, byo, project, location, max_replicas, keep_alive_s) -> None:
    """Add site NAME, reached through the local endpoint engine."""
    home, federation = open_home()
    if byo and project is None:
        raise click.UsageError("--byo needs --project (the project that owns the compute)")
    if project is not None and not byo:
        raise click.UsageError("--project names the owner of a --byo site")
    site = SiteConfig(name=name, kind="byo" if byo else "rcc", owner=project, location=location,
                      capacity={"max_replicas": max_replicas}, keep_alive_s=keep_alive_s)
    _save(home, federation, {"sites": [*federation.model_dump(mode="json")["sites"], site.model_dump(mode="json")]})
    click.echo(f"site {name!r} added ({site.kind}{', owned by ' + project if project else ''})")
