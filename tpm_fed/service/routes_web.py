"""The web page at ``/``: one HTML file and its scripts and style, all from the service itself.

Compute nodes and these machines have no internet, so nothing is loaded from
a CDN; the page is plain JavaScript modules that call the same HTTP API as
every other client, with the same bearer token. The page and its files hold
no data, so they are served without a token: a visitor without one gets the
sign-in form, and every data call the page makes needs the token (the API
answers 401 otherwise).

Only the files listed in :data:`ASSETS` are served (no path from the URL
reaches the file system), with a Content-Security-Policy that lets the page
run only its own scripts and talk only to this service.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).with_name("web")

ASSETS = {
    "style.css": "text/css",
    "main.js": "text/javascript",
    "api.js": "text/javascript",
    "sse.js": "text/javascript",
    "dom.js": "text/javascript",
    "sign_in.js": "text/javascript",
    "models.js": "text/javascript",
    "playground.js": "text/javascript",
    "sites.js": "text/javascript",
    "slo.js": "text/javascript",
    "projects.js": "text/javascript",
    "spending_chart.js": "text/javascript",
}
"""File name -> media type: everything the page loads besides ``index.html``."""

PAGE_HEADERS = {
    # The token is worth stealing: no script but ours, no request but to us, no framing.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new service version must not run with last version's scripts.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/web/{name}")
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no page file {name!r}")
    return FileResponse(WEB_DIR / name, media_type=media_type, headers=PAGE_HEADERS)
