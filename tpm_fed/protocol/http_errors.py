"""Our typed errors as HTTP answers, in OpenAI's error body: both ends of the wire.

Every refusal the service gives has the shape OpenAI's clients parse
(``{"error": {"message", "type", "param", "code"}}``, :class:`ErrorBody`) and
the status they act on: 400 invalid, 401 no or bad token, 403 not permitted,
404 unknown model or reference, 410 an expired reference, 413 too large, 429
no balance (``insufficient_quota``) or overloaded (with ``Retry-After``), 503
no site can serve now. The error's own type name travels in ``code``, so
:func:`error_from_body` rebuilds the same exception in our HTTP client. The
service writes these bodies (:func:`http_error`) and our clients read them
(:func:`error_from_body`); both import them from here, so a client never
imports the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tpm_fed.protocol import errors
from tpm_fed.protocol.errors import Overloaded, Unauthenticated


class ErrorDetail(BaseModel):
    """OpenAI's error object; ``code`` carries our error's type name."""

    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The body of every refusal (and of an error event on a stream)."""

    error: ErrorDetail


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    """The wire form of one refusal."""
    return ErrorBody(error=ErrorDetail(message=message, type=kind, code=code)).model_dump()


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str
    message: str
    retry_after_s: int | None = None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


# Most specific first: the first class an error is an instance of decides.
_STATUS: list[tuple[type[errors.TpmError], int, str]] = [
    (Unauthenticated, 401, "authentication_error"),
    (errors.PayloadTooLarge, 413, "invalid_request_error"),
    (errors.InvalidRequest, 400, "invalid_request_error"),
    (errors.FederationConfigError, 400, "invalid_request_error"),  # an operator's change or a site name
    (errors.NotPermitted, 403, "permission_error"),
    (errors.ReferenceExpired, 410, "not_found_error"),  # before its base class: gone, not absent
    (errors.ReferenceNotFound, 404, "not_found_error"),
    (errors.ReferenceCorrupt, 502, "server_error"),
    (errors.UnknownModel, 404, "not_found_error"),
    (errors.UnknownVersion, 404, "not_found_error"),
    (errors.UnknownAdapter, 404, "not_found_error"),
    (errors.InsufficientBalance, 429, "insufficient_quota"),
    (Overloaded, 429, "rate_limit_error"),
    (errors.PlacementRefused, 503, "service_unavailable"),
    (errors.SiteError, 503, "service_unavailable"),
    (errors.NotLoggedIn, 503, "service_unavailable"),
    (errors.FunctionNotRegistered, 503, "service_unavailable"),
    (errors.CodeVersionMismatch, 503, "service_unavailable"),
    (errors.BackendUnavailable, 503, "service_unavailable"),
    (errors.ModelLoadError, 503, "service_unavailable"),
]


def http_error(error: BaseException) -> HttpError:
    """The status, type and body for one of our errors (500 for one we did not foresee)."""
    for cls, status, kind in _STATUS:
        if isinstance(error, cls):
            code = "insufficient_quota" if status == 429 and kind == "insufficient_quota" else type(error).__name__
            retry = 1 if isinstance(error, Overloaded) else None
            return HttpError(status, kind, code, str(error), retry)
    return HttpError(500, "server_error", type(error).__name__, str(error))


def error_from_body(status: int, body: Any) -> errors.TpmError:
    """Rebuild the typed error an HTTP answer carries (what our client raises)."""
    try:
        detail = ErrorBody.model_validate(body).error
    except ValidationError:
        return errors.RemoteExecutionError(f"HTTP {status}: {body!r}"[:2000])
    code, message = detail.code or "", detail.message
    if status == 401:
        return Unauthenticated(message)
    if code == "insufficient_quota":
        return errors.InsufficientBalance(message)
    if code == "Overloaded":
        return Overloaded(message)
    return errors.error_from_wire({"type": code, "message": message})


def describe_errors(problems: list[dict]) -> str:
    """One line per problem of a body's validation, naming the field, as OpenAI's clients show ``message``."""
    lines = []
    for problem in problems:
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        if problem.get("type") == "extra_forbidden":
            message = "unknown parameter"
        if problem.get("type") == "json_invalid":
            where, message = "body", f"not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)
