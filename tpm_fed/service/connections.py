"""How long a connection may take to say what it wants, and how many may be open: the uvicorn server.

uvicorn closes a connection idle between requests (``timeout_keep_alive``)
and refuses requests past a number of open connections (``limit_concurrency``,
503), but it has no deadline for a request's head: a client that sends half
its headers and waits holds its connection forever, and 500 of them hold
the service. :class:`HeaderDeadline` closes a connection whose request head
is not complete ``header_timeout_s`` after its first byte (or after it
opened). The body has its own deadlines (:class:`tpm_fed.service.limits.BodyLimits`).

Behind a reverse proxy the proxy's own limits come first (nginx
``client_header_timeout``, ``client_body_timeout``, ``limit_conn``); see
docs/service.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from tpm_fed.service.limits import BODY_DEADLINE_S, BODY_TIMEOUT_S

@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines and caps for the service's connections.

    Attributes:
        header_timeout_s: Most seconds from a connection's first byte (or its opening) to a complete
            request head.
        body_timeout_s: Most seconds between two pieces of a request body.
        body_deadline_s: Most seconds for a whole request body.
        keep_alive_s: An idle connection between requests is closed after this long.
        max_connections: Open connections (and requests in flight) past which a request is answered 503.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = BODY_TIMEOUT_S
    body_deadline_s: float = BODY_DEADLINE_S
    keep_alive_s: float = 30.0
    max_connections: int = 1000

    VARIABLES = {"header_timeout_s": "TPM_SERVICE_HEADER_TIMEOUT_S", "body_timeout_s": "TPM_SERVICE_BODY_TIMEOUT_S",
                 "body_deadline_s": "TPM_SERVICE_BODY_DEADLINE_S", "keep_alive_s": "TPM_SERVICE_KEEP_ALIVE_S",
                 "max_connections": "TPM_SERVICE_MAX_CONNECTIONS"}

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> ConnectionLimits:
        """The defaults, with what the operator set in the ``TPM_SERVICE_*`` variables above."""
        environ = os.environ if environ is None else environ
        limits = cls()
        for field, variable in cls.VARIABLES.items():
            value = environ.get(variable)
            if value:
                kind = type(getattr(limits, field))
                try:
                    parsed = kind(value)
                except ValueError:
                    raise SystemExit(f"{variable}={value!r}: not a number") from None
                if parsed <= 0:
                    raise SystemExit(f"{variable}={value!r}: must be more than 0")
                limits = replace(limits, **{field: parsed})
        return limits


def service_server(app: Any, limits: ConnectionLimits, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` with these connection limits (``config``: more ``uvicorn.Config``
    settings). The body's deadlines are the app's own :class:`~tpm_fed.service.limits.BodyLimits`."""
    import uvicorn

    settings = {"log_level": "warning", "lifespan": "off", **config}
    return uvicorn.Server(uvicorn.Config(app, http=header_deadline(limits.header_timeout_s),
                                         timeout_keep_alive=limits.keep_alive_s,
                                         limit_concurrency=limits.max_connections, **settings))


def header_deadline(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools, else h11), closing connections whose head is late."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": seconds})


def _base_protocol() -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


class HeaderDeadline(_base_protocol()):  # type: ignore[misc]
    """uvicorn's protocol, plus a clock on each request head (see the module's docstring)."""

    header_timeout_s = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: Any = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._in_request():  # a new request's head begins (or goes on)
            self._arm()
        super().data_received(data)
        if self._in_request():  # its head is complete
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # Its head was complete, and the connection is a WebSocket from now on (a running task's back channel
        # lives as long as its task): without this the clock, armed when the connection opened, closed every
        # channel header_timeout_s after it opened, without a close frame.
        self._disarm()
        super().handle_websocket_upgrade(*args)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()
