"""``GET /tpm/v1/auth``: how to log in to this service, answered to anyone.

A client that is given only a URL (``TPM_URL``, ``tpm login --service URL``)
learns here which identities the service accepts and, for Globus Auth, the
native app client to log in with and the scope to ask for; ``tpm login``
then runs globus-sdk's login flow for exactly that. Nothing secret is in it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter(prefix="/tpm/v1")


@router.get("/auth")
def how_to_log_in(request: Request) -> dict[str, Any]:
    """``{"mode": "local"}``, or ``{"mode": "globus", "client_id", "scope", "resource_server"}``."""
    return request.app.state.auth.login_info()
