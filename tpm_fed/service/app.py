"""The service's ASGI application: routes, identity, and errors in OpenAI's shape.

``build_app(service, auth)`` wires the OpenAI-compatible routes
(:mod:`tpm_fed.service.routes_openai`) and tpm-fed's native ones
(:mod:`tpm_fed.service.routes_native`) and the operators' ones
(:mod:`tpm_fed.service.routes_admin`) to what the composition root built
(:class:`tpm_fed.service.assembly.ServiceAssembly`). Every
route but ``/health``, the page and ``/tpm/v1/auth...`` (how to log in) needs a bearer
token; every refusal is an OpenAI error body with the status OpenAI's
clients expect (:mod:`tpm_fed.protocol.http_errors`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpm_fed.batches.protocol import MAX_FILE_BYTES
from tpm_fed.protocol.errors import InvalidRequest, TpmError
from tpm_fed.protocol.http_errors import describe_errors, error_body, http_error
from tpm_fed.service.assembly import ServiceAssembly
from tpm_fed.service.auth import Authenticator
from tpm_fed.service.errors import unexpected_error
from tpm_fed.service.hosts import HostCheck
from tpm_fed.service.limits import BodyLimits

logger = logging.getLogger(__name__)


def build_app(service: ServiceAssembly, auth: Authenticator, *, operators: frozenset[str] = frozenset()) -> Any:
    """The ASGI app serving what ``service`` built (its engine, back channel, serving objects, batch runner
    and stores) to callers ``auth`` accepts. Builds nothing of its own but the routes and the wrappers:
    several apps may serve one assembly (tests do, in turn).

    Args:
        service: The composition root's parts (:class:`tpm_fed.service.assembly.ServiceAssembly`).
        auth: Turns bearer tokens into identities.
        operators: Identities that may read every project and use the operator routes (``/tpm/v1/admin``).
    """
    from tpm_fed.service.routes_auth import router as login
    from tpm_fed.service.routes_batches import router as batches
    from tpm_fed.service.routes_metrics import router as watching
    from tpm_fed.service.routes_responses import router as responses
    from tpm_fed.service.routes_stores import router as stores
    from tpm_fed.service.routes_channel import router as back_channel
    from tpm_fed.service.routes_admin import router as admin
    from tpm_fed.service.routes_native import router as native
    from tpm_fed.service.routes_openai import router as openai
    from tpm_fed.service.routes_web import router as page

    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN, which the service's
    # Content-Security-Policy would have to allow. /openapi.json describes the routes for any viewer.
    app = FastAPI(title="tpm-fed", summary="Federated access to large AI models",
                  description="OpenAI-compatible routes under /v1; tpm-fed's own under /tpm/v1.",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    # What routes read by name (the typed getters of tpm_fed.service.assembly read app.state.service).
    app.state.runtime, app.state.channels = service.engine, service.channels
    app.state.batches, app.state.stores = service.batches, service.stores
    app.state.slo, app.state.metrics = service.slo, service.metrics
    app.state.auth = auth
    if auth.mode == "globus":  # the page's "Log in with Globus" runs the code flow with the service's client
        from tpm_fed.service.browser_login import BrowserLogins

        app.state.browser_logins = BrowserLogins(auth.auth_client, auth.scope, auth.audience)
    app.state.operators = operators
    for router in (openai, native, admin, login, watching, back_channel, page, batches, stores, responses):
        app.include_router(router)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(TpmError)
    async def _tpm_error(_: Request, error: TpmError) -> JSONResponse:
        app.state.metrics.error(error)
        answer = http_error(error)
        return JSONResponse(answer.body(), status_code=answer.status, headers=answer.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        app.state.metrics.error(InvalidRequest(describe_errors(error.errors())))
        return JSONResponse(error_body(describe_errors(error.errors()), "invalid_request_error",
                                          "InvalidRequest"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error", f"HTTP{error.status_code}"),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        app.state.metrics.error(error)
        answer = unexpected_error(error, logger)  # opaque: the detail only in the operator's log
        return JSONResponse(answer.body(), status_code=answer.status)


    app.state.hosts = HostCheck(app)  # serves no Host until serve_at names where the service is bound
    # A batch file may be bigger than one request: it is never sent to a site whole.
    return BodyLimits(app.state.hosts, larger={"/v1/files": MAX_FILE_BYTES + UPLOAD_OVERHEAD_BYTES})


def serve_at(app: Any, url: str, *, worker_url: str | None = None, hosts: tuple[str, ...] = ()) -> None:
    """Tell ``app`` (inside its wrappers) where it is served, once its socket is bound.

    Args:
        url: The bound address (``http://127.0.0.1:PORT``).
        worker_url: Where workers reach the service's back channel (default ``url``): the one URL any
            task is given, whatever a caller's request says.
        hosts: More ``Host`` values callers may use (a reverse proxy's public name).
    """
    inner = fastapi_app(app)
    inner.state.channels.worker_url = worker_url or url
    inner.state.hosts.serve(url, (*hosts, *([worker_url] if worker_url else [])))


def fastapi_app(app: Any) -> Any:
    """The FastAPI app inside ``app``'s ASGI wrappers (what :func:`build_app` returns is wrapped)."""
    while not hasattr(app, "state"):
        app = app.app
    return app


UPLOAD_OVERHEAD_BYTES = 1024 * 1024
"""What multipart framing may add around an uploaded file's bytes."""

