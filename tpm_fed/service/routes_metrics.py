"""What operators watch: Prometheus metrics (``GET /metrics``) and the SLO report (``GET /tpm/v1/slo``).

``/metrics`` needs an operator's bearer token (it names projects and their
spending); Prometheus sends one with ``authorization: {credentials: ...}`` in
its scrape config. The SLO report is for everyone: users plan around it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tpm_fed.protocol.errors import NotPermitted
from tpm_fed.service.auth import identity_of

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, identity: str = Depends(identity_of)) -> Response:
    if identity not in request.app.state.operators:
        raise NotPermitted(f"{identity!r} is not an operator of this service: /metrics is for operators")
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get("/tpm/v1/slo")
def slo(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    """Per request kind: p50/p95 latency and availability over the window, against the operator's targets."""
    return request.app.state.slo.report()
