"""Typed errors: every refusal a user can meet is one of these.

Errors raised inside an endpoint worker travel back as plain data
(:func:`TpmError.to_wire`) and are rebuilt here with :func:`error_from_wire`,
so a caller catches the same type whether the check ran locally or remotely.
"""

from __future__ import annotations

from typing import Any


class TpmError(Exception):
    """Base of every error tpm-fed raises on purpose."""

    def to_wire(self) -> dict[str, str]:
        return {"type": type(self).__name__, "message": str(self)}


class InvalidRequest(TpmError, ValueError):
    """A request is malformed: a field is missing, empty or out of range."""


class PayloadTooLarge(InvalidRequest):
    """A request or result is over the service's payload limit (10 MB for Globus Compute)."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested tokens do not fit in the model's context."""


class UnknownPoint(InvalidRequest, LookupError):
    """An intervention names a point (module path, head) the model does not have."""


class UnknownAdapter(TpmError, LookupError):
    """No adapter of that name, or not at the version asked for."""


class AdapterMismatch(InvalidRequest):
    """Adapter weights do not fit their catalog architecture, or its widths do not fit the core."""


class UnknownModel(TpmError, LookupError):
    """The federation has no model of that name."""


class UnknownVersion(TpmError, LookupError):
    """The model exists but not at the version asked for."""


class ReferenceNotFound(TpmError, LookupError):
    """A result reference names nothing its store holds (never written, evicted, or altered)."""


class ReferenceExpired(ReferenceNotFound):
    """A result reference is past its site's retention: its tensors are (or will shortly be) gone."""


class ReferenceCorrupt(TpmError):
    """The bytes a result reference led to do not match the digest the worker recorded."""


class ModelLoadError(TpmError):
    """A replica could not load the model (missing or corrupt files)."""


class BackendUnavailable(TpmError):
    """The backend a request or model pinned cannot serve it on that site."""


class FederationConfigError(TpmError):
    """The federation file is missing, unreadable or invalid."""


class MissingDependency(TpmError):
    """A piece this configuration needs is not installed; the message names the extra to install."""


class NotPermitted(TpmError, PermissionError):
    """The caller may not do this: not in the project, or another project's own site."""


class InsufficientBalance(TpmError):
    """The project cannot cover the request's estimate at any eligible site."""


class PlacementRefused(TpmError):
    """No replica can take the request: no eligible site, or every queue is full.

    Attributes:
        explanation: The candidates the broker considered, and why each was out.
    """

    def __init__(self, message: str, explanation: str = "") -> None:
        super().__init__(message + (f"\n{explanation}" if explanation else ""))
        self.explanation = explanation


class SiteError(TpmError):
    """A site could not be started or reached."""


class ReplicaLost(SiteError):
    """A rank of a replica split over several processes or nodes died: the replica failed as a
    whole (its other ranks are stopped), and its requests may run again on a fresh one."""


class EndpointOffline(SiteError):
    """The site's Globus Compute endpoint is not connected (or Globus Compute does not know it)."""


class ResultNotData(SiteError):
    """A site's worker sent back something other than JSON data (a pickled object, code):
    refused unread, so nothing a worker sends can run in the service."""


class NotLoggedIn(TpmError):
    """Globus Compute needs credentials this machine does not have: run ``tpm login``."""


class FunctionNotRegistered(TpmError):
    """A site has no registered id for a serving function, or the code changed since it was registered."""


class CodeVersionMismatch(TpmError):
    """The endpoint runs different serving code than the client expects (install the same tpm-fed there)."""


class Unauthenticated(TpmError):
    """The service got no bearer token, or one it does not accept (expired, inactive, for another audience)."""


class Overloaded(TpmError):
    """The service holds as many requests as it takes; retry after a moment."""


class RemoteExecutionError(TpmError):
    """A function raised inside an endpoint worker.

    Attributes:
        remote_traceback: The traceback text the endpoint sent back.
    """

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


def _wire_types() -> dict[str, type[TpmError]]:
    found: dict[str, type[TpmError]] = {}
    pending: list[type[TpmError]] = [TpmError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_from_wire(data: dict[str, Any]) -> TpmError:
    """Rebuild a typed error sent back by a worker.

    Unknown type names (a newer worker than this client) become
    :class:`RemoteExecutionError` so nothing is lost.
    """
    cls = _wire_types().get(str(data.get("type")), None)
    message = str(data.get("message", ""))
    if cls is None or cls is RemoteExecutionError:
        return RemoteExecutionError(f"{data.get('type')}: {message}")
    return cls(message)
