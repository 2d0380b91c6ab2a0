"""Suspected: ``/docs`` and ``/redoc`` loaded Swagger UI and ReDoc from a CDN, with no Content-Security-Policy.

FastAPI's default pages pull their scripts from cdn.jsdelivr.net into the
service's origin, where a browser holds a caller's token: a script from a
third party would run with it. They are off; the machine-readable
description (``/openapi.json``) stays, for any viewer the caller trusts.
"""

from __future__ import annotations

import httpx


def test_no_page_loads_scripts_from_a_cdn_and_the_openapi_description_stays(service):
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        answer = httpx.get(f"{service.url}{page}", headers=service.headers)
        assert answer.status_code == 404, (page, answer.text[:200])
        assert "cdn.jsdelivr.net" not in answer.text
    description = httpx.get(f"{service.url}/openapi.json", headers=service.headers)
    assert description.status_code == 200
    assert "/v1/completions" in description.json()["paths"]
