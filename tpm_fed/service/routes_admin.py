"""The operator routes (``/tpm/v1/admin``): projects, sites, models and adapters, changed while serving.

Only identities in ``app.state.operators`` may call them (403 for anyone
else, before anything is read or changed). A change to the federation goes
through :meth:`Runtime.change_federation`: the whole federation is
validated again, the file is written atomically, and the running service
adopts it at once: a new member can spend on their next request, on the
same warm replica; only a site that changed or was removed is stopped
(it drains: the work it has finishes, no new work reaches it).

- ``GET /projects``; ``POST /projects``; ``POST /projects/{p}/members``;
  ``DELETE /projects/{p}/members/{identity}``; ``POST /projects/{p}/grants``.
- ``GET /sites``; ``POST /sites``; ``PUT /sites/{s}`` (replace: the site
  restarts); ``DELETE /sites/{s}`` (drains).
- ``GET /models``; ``POST /models`` (a model entry; its files must already be
  on the service's machine); ``POST /models/{m}/tags`` (store models).
- ``GET /adapters``; ``POST /adapters`` (architecture JSON and the
  safetensors weights, base64).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request

from tpm_fed.protocol.errors import AdapterMismatch, FederationConfigError, InvalidRequest, NotPermitted
from tpm_fed.protocol.safetensors_header import SafetensorsFormatError, parse_header
from tpm_fed.service.admin_models import (
    AdapterBody, GrantBody, MemberBody, ModelConfig, ProjectBody, SiteConfig, TagBody,
)
from tpm_fed.service.auth import identity_of
from tpm_fed.sites.parsl_engine import load_engine_config
from tpm_fed.store import ModelStore


def operator_of(request: Request, identity: str = Depends(identity_of)) -> str:
    """The caller, if they are an operator of this service (the routes' FastAPI dependency)."""
    if identity not in request.app.state.operators:
        raise NotPermitted(f"{identity!r} is not an operator of this service")
    return identity


router = APIRouter(prefix="/tpm/v1/admin", dependencies=[Depends(operator_of)], tags=["operator"])

Entry = dict[str, Any]


# ----- projects ---------------------------------------------------------------------
@router.get("/projects")
def list_projects(request: Request) -> dict[str, Any]:
    return {"projects": [p.model_dump(mode="json") for p in _runtime(request).federation.projects]}


@router.post("/projects", status_code=201)
def add_project(body: ProjectBody, request: Request) -> Entry:
    """A new project (a name already taken is refused: the federation's names are unique)."""
    federation = _runtime(request).change_federation(_append("projects", body.model_dump(mode="json")))
    return federation.project(body.name).model_dump(mode="json")


@router.delete("/projects/{project}")
def remove_project(project: str, request: Request) -> dict[str, Any]:
    """Remove a project: its members can no longer spend, its grants go to 0.

    Requests it already placed finish and are charged; its statement stays in
    the ledger. Refused while a byo site names it as owner: remove that first.
    """

    def edit(raw: Entry) -> Entry:
        _named(raw["projects"], project, "project")
        return {**raw, "projects": [p for p in raw["projects"] if p["name"] != project]}

    _runtime(request).change_federation(edit)
    return {"removed": project}


@router.post("/projects/{project}/members")
def add_member(project: str, body: MemberBody, request: Request) -> Entry:
    def add(entry: Entry) -> Entry:
        return {**entry, "members": sorted({*entry["members"], body.identity})}

    return _change_entry(request, "projects", project, add)


@router.delete("/projects/{project}/members/{identity}")
def remove_member(project: str, identity: str, request: Request) -> Entry:
    def remove(entry: Entry) -> Entry:
        if identity not in entry["members"]:
            raise FederationConfigError(f"{identity!r} is not a member of project {project!r}")
        return {**entry, "members": [m for m in entry["members"] if m != identity]}

    return _change_entry(request, "projects", project, remove)


@router.post("/projects/{project}/grants")
def grant(project: str, body: GrantBody, request: Request) -> Entry:
    """Add ``service_units`` to the project's allocation at a site (a negative amount takes back)."""

    def add_units(entry: Entry) -> Entry:
        granted = entry["allocations"].get(body.site, 0.0) + body.service_units
        return {**entry, "allocations": {**entry["allocations"], body.site: granted}}

    def edit(raw: Entry) -> Entry:
        _named(raw["sites"], body.site, "site")  # named first: "unknown site", not a validation riddle
        return _change(raw, "projects", project, add_units)

    return _runtime(request).change_federation(edit).project(project).model_dump(mode="json")


# ----- sites ------------------------------------------------------------------------
@router.get("/sites")
def list_sites(request: Request) -> dict[str, Any]:
    return {"sites": [s.model_dump(mode="json") for s in _runtime(request).federation.sites]}


@router.post("/sites", status_code=201)
def add_site(body: SiteConfig, request: Request) -> Entry:
    """A new site: unchanged sites keep running; the new one starts on its first request."""
    _check_engine_config(request, body)
    federation = _runtime(request).change_federation(_append("sites", _as_written(body)))
    return federation.site(body.name).model_dump(mode="json")


@router.put("/sites/{site}")
def replace_site(site: str, body: SiteConfig, request: Request) -> Entry:
    """A site's new configuration: the old one drains and stops; the new one starts on first use."""
    if body.name != site:
        raise InvalidRequest(f"name: the body names site {body.name!r}, the path {site!r}")
    _check_engine_config(request, body)
    return _change_entry(request, "sites", site, lambda _: _as_written(body))


@router.delete("/sites/{site}")
def remove_site(site: str, request: Request) -> dict[str, Any]:
    """Remove a site. It drains: its replicas take no new work and stop once their requests are done.

    Refused while anything names it (a grant, a model's site list): change those first.
    """

    def edit(raw: Entry) -> Entry:
        _named(raw["sites"], site, "site")
        return {**raw, "sites": [s for s in raw["sites"] if s["name"] != site]}

    _runtime(request).change_federation(edit)
    return {"removed": site}


# ----- models -----------------------------------------------------------------------
@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    cards = {card["id"]: card["tpm"] for card in runtime.model_cards()}
    return {"models": [{**config.model_dump(mode="json"), "version": cards[config.name]["version"],
                        "versions": cards[config.name]["versions"],
                        **({"problem": cards[config.name]["problem"]} if "problem" in cards[config.name] else {})}
                       for config in runtime.federation.models]}


@router.post("/models", status_code=201)
def add_model(body: ModelConfig, request: Request) -> Entry:
    """A model entry: a directory on the service's machine (relative to the federation file), or
    ``store: true`` for versions already in the service's model store."""
    entry = body.model_dump(mode="json", exclude_defaults=True)
    return _runtime(request).change_federation(_append("models", entry)).model(body.name).model_dump(mode="json")


@router.post("/models/{model}/tags")
def tag_model(model: str, body: TagBody, request: Request) -> dict[str, Any]:
    """Point a tag at a stored version (``NAME@TAG`` then serves it)."""
    runtime = _runtime(request)
    if not runtime.federation.model(model).store:
        raise InvalidRequest(f"model {model!r} is served from a directory, not the model store: it has no tags")
    version = ModelStore(runtime.federation.store).tag(model, body.version, body.tag, move=body.move)
    return {"model": model, "tag": body.tag, "version": version}


# ----- adapters ---------------------------------------------------------------------
@router.get("/adapters")
def list_adapters(request: Request) -> dict[str, Any]:
    return {"adapters": [_adapter(record) for record in _runtime(request).adapters.all()]}


@router.post("/adapters", status_code=201)
def register_adapter(body: AdapterBody, request: Request) -> Entry:
    """Register a version (the same architecture and weights again is the same version)."""
    blob = body.weights_bytes()
    try:
        parse_header(blob, "adapter weights")
    except SafetensorsFormatError:
        raise AdapterMismatch("weights: not a safetensors file (pickled weights are not accepted)") from None
    registry = _runtime(request).adapters
    with tempfile.TemporaryDirectory(prefix="tpm-adapter-") as folder:
        weights = Path(folder) / "weights.safetensors"
        weights.write_bytes(blob)
        record = registry.register(body.name, body.architecture, weights, body.description)
    return _adapter(record)


# ----- helpers ----------------------------------------------------------------------
def _runtime(request: Request) -> Any:
    return request.app.state.runtime


def _adapter(record: Any) -> Entry:
    return {"ref": record.ref, **record.model_dump(mode="json")}


def _as_written(site: SiteConfig) -> Entry:
    return site.model_dump(mode="json", exclude_defaults=True)


def _append(collection: str, entry: Entry) -> Callable[[Entry], Entry]:
    return lambda raw: {**raw, collection: [*raw[collection], entry]}


def _change_entry(request: Request, collection: str, name: str, change: Callable[[Entry], Entry]) -> Entry:
    federation = _runtime(request).change_federation(lambda raw: _change(raw, collection, name, change))
    return {"projects": federation.project, "sites": federation.site}[collection](name).model_dump(mode="json")


def _change(raw: Entry, collection: str, name: str, change: Callable[[Entry], Entry]) -> Entry:
    _named(raw[collection], name, collection.removesuffix("s"))
    return {**raw, collection: [change(e) if e["name"] == name else e for e in raw[collection]]}


def _named(entries: list[Entry], name: str, what: str) -> Entry:
    for entry in entries:
        if entry["name"] == name:
            return entry
    known = ", ".join(entry["name"] for entry in entries) or "none"
    raise FederationConfigError(f"unknown {what} {name!r}; the federation has: {known}")


def _check_engine_config(request: Request, site: SiteConfig) -> None:
    """A parsl site's endpoint config must load, as the endpoint's own loader judges it."""
    if site.engine_config is None:
        return

    path = _runtime(request).home.federation_file.parent / site.engine_config
    load_engine_config(path).engine.shutdown()
