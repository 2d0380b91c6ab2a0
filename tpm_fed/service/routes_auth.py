"""Logging in, answered to anyone.

- ``GET /tpm/v1/auth``: how to log in to this service. A client given only a
  URL (``TPM_URL``, ``tpm login --service URL``) learns which identities the
  service accepts and, for Globus Auth, the native app client to log in with
  and the scope to ask for; ``tpm login`` then runs globus-sdk's login flow
  for exactly that. Nothing secret is in it.
- ``GET /tpm/v1/auth/login`` and ``/tpm/v1/auth/callback``: the web page's
  "Log in with Globus" (:mod:`tpm_fed.service.browser_login`); Globus mode only.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tpm_fed.protocol.errors import InvalidRequest, TpmError
from tpm_fed.service.browser_login import STATE_COOKIE, STATE_LIFETIME_S

router = APIRouter(prefix="/tpm/v1")


@router.get("/auth")
def how_to_log_in(request: Request) -> dict[str, Any]:
    """``{"mode": "local"}``, or ``{"mode": "globus", "client_id", "scope", "resource_server"}``."""
    return request.app.state.auth.login_info()


@router.get("/auth/login")
def log_in_with_globus(request: Request) -> RedirectResponse:
    """Send the browser to Globus Auth to log in for this service's scope."""
    logins = _browser_logins(request)
    url, state = logins.start(str(request.url_for("log_in_callback")))
    response = RedirectResponse(url, status_code=302)
    response.set_cookie(STATE_COOKIE, state, max_age=int(STATE_LIFETIME_S), httponly=True, samesite="lax",
                        path="/tpm/v1/auth", secure=request.url.scheme == "https")
    return response


@router.get("/auth/callback", name="log_in_callback")
def log_in_callback(request: Request, code: str | None = None, state: str | None = None,
                    error: str | None = None) -> Any:
    """Globus Auth's answer: the page gets its token in the URL fragment, or a page saying what went wrong."""
    logins = _browser_logins(request)
    try:
        if error is not None or not code or not state:
            raise InvalidRequest(f"Globus Auth did not log you in ({error or 'no code in its answer'})")
        token = logins.finish(code, state, request.cookies.get(STATE_COOKIE),
                              str(request.url_for("log_in_callback")))
        request.app.state.auth.authenticate(token)  # active, unexpired, for this service: as every call checks
    except TpmError as refused:
        page = (f"<!doctype html><title>tpm-fed: login failed</title><h1>Login failed</h1>"
                f"<p>{html.escape(str(refused))}</p><p><a href=\"/\">Back to the page</a></p>")
        return HTMLResponse(page, status_code=401 if "Unauthenticated" in type(refused).__name__ else 400)
    response = RedirectResponse(f"/#token={token}", status_code=302)
    response.delete_cookie(STATE_COOKIE, path="/tpm/v1/auth")
    return response


def _browser_logins(request: Request):
    logins = getattr(request.app.state, "browser_logins", None)
    if logins is None:
        raise InvalidRequest("this service does not take Globus logins (local mode): open the link "
                             "`tpm serve` or `tpm service status` prints")
    return logins
