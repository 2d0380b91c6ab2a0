"""What the service tells callers about the federation, as JSON-ready dicts: read-only views.

Models with their versions and per-site warmth, one request's record,
statements and balances, sites with their replicas. Each view reads the
runtime's database and registry; none changes anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from tpm_fed.engine.interface import EngineClient
from tpm_fed.state.schema import MICRO, charges_table, requests_table
from tpm_fed.store import ModelStore


def model_cards(runtime: EngineClient) -> list[dict[str, Any]]:
    """``GET /v1/models``: each model as OpenAI lists it, plus a ``tpm`` object."""
    replicas = runtime.broker.registry.all()
    cards = []
    for config in runtime.federation.models:
        try:
            resolved = runtime.catalog.resolve_name(config.name)
        except Exception as error:  # a broken model is listed, with why it cannot serve
            version, context, problem = None, None, f"{type(error).__name__}: {error}"
        else:
            version, context, problem = resolved.spec.version, resolved.context_length, None
        placer = runtime.broker.placer
        unplaceable = placer.too_small(config.name)
        sites, nodes = {}, {}
        for site in config.sites or [s.name for s in runtime.federation.sites]:
            if site not in unplaceable:
                nodes[site] = placer.nodes(config.name, site)
            states = {r.state for r in replicas if r.site == site and r.model == config.name and r.version == version}
            sites[site] = "hot" if "warm" in states else "starting" if "starting" in states else "cold"
        cards.append({
            "id": config.name,
            "object": "model",
            "created": 0,
            "owned_by": runtime.federation.name,
            "tpm": {"version": version, "versions": _stored_versions(runtime, config), "kinds": list(config.kinds),
                    "backend": config.backend, "dtype": config.dtype, "sites": sites, "context_length": context,
                    "source": "store" if config.store else "directory",
                    # How a replica is split, the nodes it holds at each site, and where it cannot run.
                    "tensor_parallel_size": config.tensor_parallel_size,
                    "pipeline_parallel_size": config.pipeline_parallel_size, "nodes": nodes,
                    **({"unplaceable": unplaceable} if unplaceable else {}),
                    **({"problem": problem} if problem else {})},
        })
    return cards


def _stored_versions(runtime: EngineClient, config: Any) -> list[dict[str, Any]]:
    if not config.store:
        return []

    return [{"version": v.version, "tags": v.tags, "created": v.created}
            for v in ModelStore(runtime.federation.store).versions(config.name)]


def request_record(runtime: EngineClient, request_id: str) -> dict[str, Any] | None:
    """A request's status and charge, with who asked (the route checks that)."""
    with runtime.log.engine.connect() as db:
        logged = db.execute(select(requests_table).where(requests_table.c.request_id == request_id)).one_or_none()
        charge = db.execute(select(charges_table).where(charges_table.c.request_id == request_id)).one_or_none()
    if charge is None:
        return None
    return {
        "request_id": request_id,
        "identity": charge.identity,
        "project": charge.project,
        "model": charge.model,
        "version": charge.version,
        "kind": charge.kind,
        "site": charge.site,
        "status": logged.status if logged is not None else "placed",
        "charge_state": charge.state,
        "charged_su": charge.charged_usu / MICRO,
        "estimate_su": charge.estimate_usu / MICRO,
        "prompt_tokens": charge.prompt_tokens,
        "completion_tokens": charge.completion_tokens,
        "error": logged.error if logged is not None else None,
    }


def statement(runtime: EngineClient, project: str, since: float | None) -> list[dict[str, Any]]:
    """A project's charges; ``in_doubt`` marks a reservation the sweeper will settle or release
    (held past its deadline, or by a process that is gone)."""
    doubtful = {c.request_id for c in runtime.ledger.in_doubt()}
    rows = []
    for charge in runtime.ledger.statement(project, since):
        row = dataclasses.asdict(charge)
        row["charged_su"] = row.pop("charged_usu") / MICRO
        row["estimate_su"] = row.pop("estimate_usu") / MICRO
        row["in_doubt"] = charge.request_id in doubtful
        rows.append(row)
    return rows


def balances(runtime: EngineClient, project: str) -> list[dict[str, Any]]:
    return [{"project": b.project, "site": b.site, "granted_su": b.granted_usu / MICRO,
             "spent_su": b.spent_usu / MICRO, "reserved_su": b.reserved_usu / MICRO,
             "available_su": b.available_usu / MICRO} for b in runtime.ledger.balances(project)]


def sites_report(runtime: EngineClient) -> dict[str, Any]:
    """Sites as their runtime sees them (with what callers choose by: billing, owner, location), and
    every live replica."""
    configs = {site.name: site for site in runtime.federation.sites}
    return {
        "sites": [{**dataclasses.asdict(status), **_site_facts(configs.get(status.name))}
                  for status in runtime.status()],
        "replicas": [dataclasses.asdict(replica) for replica in runtime.broker.registry.all() if replica.live],
    }


def _site_facts(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    return {"billing": config.billing, "owner": config.owner, "location": config.location,
            "max_replicas": config.capacity.max_replicas, "keep_alive_s": config.keep_alive_s}
