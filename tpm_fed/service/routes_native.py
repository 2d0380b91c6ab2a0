"""tpm-fed's own routes, for what OpenAI has no shape for.

- ``POST /tpm/v1/requests``: any request kind in its wire form (generate,
  trace, embed); the answer is the result's wire form (tensors as one
  safetensors blob, base64 in JSON; never a pickle).
- ``POST /tpm/v1/explain``: where the broker would place a request, and why.
- ``POST /tpm/v1/quotes``: the most a request would be charged and when it
  would be done, before anything runs (:class:`~tpm_fed.protocol.quotes.Quote`).
- ``GET /tpm/v1/requests/{id}``: a request's status (its owner only).
- ``GET /tpm/v1/requests/{id}/tensors``: a result left by reference, streamed
  as its safetensors bytes (its owner only; 404 gone, 410 expired).
- ``GET /tpm/v1/usage``, ``GET /tpm/v1/allocations``: the caller's projects only.
- ``GET /tpm/v1/sites``: sites and replicas.
- ``GET /tpm/v1/models/{model}/points``: the points a trace may name.
- ``GET /tpm/v1/whoami``: the identity the token maps to, and its projects.
"""

from __future__ import annotations

import itertools
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tpm_fed.protocol.errors import NotPermitted
from tpm_fed.protocol.kinds import request_from_wire
from tpm_fed.service.auth import identity_of
from tpm_fed.service.serving import serve

router = APIRouter(prefix="/tpm/v1")


@router.post("/requests")
async def submit(request: Request, wire: dict[str, Any] = Body(...), identity: str = Depends(identity_of)) -> Any:
    """Serve one request of any kind; the body is its wire form (``kind`` says which)."""
    served = await serve(request.app.state.runtime, request_from_wire(wire), identity, request.app.state.metrics)
    return served.to_wire()


@router.post("/explain")
async def explain(request: Request, wire: dict[str, Any] = Body(...), identity: str = Depends(identity_of)) -> Any:
    """The broker's decision for a request (nothing is reserved or run)."""
    decision = await run_in_threadpool(request.app.state.runtime.explain, request_from_wire(wire), identity)
    chosen = decision.chosen
    return {"site": chosen.site if chosen else None, "replica": chosen.replica_id if chosen else None,
            "refusal": decision.refusal, "explanation": decision.explain()}


@router.post("/quotes")
async def quote(request: Request, wire: dict[str, Any] = Body(...), identity: str = Depends(identity_of)) -> Any:
    """Price a request of any kind where it would be placed now (nothing is reserved or run)."""
    priced = await run_in_threadpool(request.app.state.runtime.quote, request_from_wire(wire), identity)
    return priced.to_wire()


@router.get("/requests/{request_id}")
def request_status(request_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    runtime = request.app.state.runtime
    # Still queued for its replica: where it stands; otherwise what the log and the ledger say.
    record = runtime.queue_place(request_id) or runtime.request_record(request_id)
    if record is None or not _may_read(request, identity, record["identity"]):
        # The same answer for "absent" and "someone else's": ids are not an oracle.
        raise NotPermitted(f"no request {request_id!r} of yours")
    return record


@router.get("/requests/{request_id}/tensors")
def tensors(request_id: str, request: Request, identity: str = Depends(identity_of)) -> StreamingResponse:
    """The safetensors bytes of a result left by reference, streamed from its site's store."""
    runtime = request.app.state.runtime
    record = runtime.request_record(request_id)
    if record is None or not _may_read(request, identity, record["identity"]):
        raise NotPermitted(f"no request {request_id!r} of yours")
    reference, chunks = runtime.references.open(request_id)  # expired or missing: refused here
    first = next(chunks, b"")
    return StreamingResponse(itertools.chain([first], chunks), media_type="application/octet-stream",
                             headers={"Content-Length": str(reference.nbytes), **(
                                 {"X-Tpm-Blake3": reference.blake3} if reference.blake3 else
                                 {"X-Tpm-Sha256": reference.sha256})})


@router.get("/usage")
def usage(request: Request, project: str | None = None, since: float | None = None,
          identity: str = Depends(identity_of)) -> dict[str, Any]:
    runtime = request.app.state.runtime
    projects = _readable_projects(request, identity, project)
    return {"charges": [charge for name in projects for charge in runtime.statement(name, since)]}


@router.get("/allocations")
def allocations(request: Request, project: str | None = None, identity: str = Depends(identity_of)) -> dict[str, Any]:
    runtime = request.app.state.runtime
    projects = _readable_projects(request, identity, project)
    return {"allocations": [balance for name in projects for balance in runtime.balances(name)]}


@router.get("/sites")
def sites(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return request.app.state.runtime.sites_report()


@router.get("/models/{model}/points")
def points(model: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return request.app.state.runtime.points(model).model_dump(mode="json")


@router.get("/whoami")
def whoami(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    runtime = request.app.state.runtime
    return {"identity": identity, "projects": runtime.projects_of(identity),
            "operator": identity in request.app.state.operators}


def _may_read(request: Request, identity: str, owner: str) -> bool:
    return identity == owner or identity in request.app.state.operators


def _readable_projects(request: Request, identity: str, asked: str | None) -> list[str]:
    """The projects whose records ``identity`` may read: theirs (every project for an operator)."""
    runtime = request.app.state.runtime
    operator = identity in request.app.state.operators
    mine = runtime.all_projects() if operator else runtime.projects_of(identity)
    if asked is None:
        return mine
    if asked not in mine:
        raise NotPermitted(f"{identity!r} is not a member of project {asked!r}")
    return [asked]
