"""The ``Host`` names this service answers to: any other is refused (400) before the app sees it.

A caller who can make the service believe it is reached somewhere else (a
``Host`` naming their own listener, or a name that a DNS rebinding points at
loopback) must get nothing for it. The service takes no address from a
request (the back channel's URL is its own, :func:`tpm_fed.service.app.serve_at`);
this check is the second line: a request naming a host and port the service
does not serve is not served at all.

Served names are set once the socket is bound (:meth:`HostCheck.serve`):

- bound to loopback (the embedded default): ``127.0.0.1``, ``localhost`` and
  ``[::1]``, with the bound port;
- bound to another interface: that address with the bound port;
- always: the workers' URL (``TPM_SERVICE_WORKER_URL``: workers post there
  with its host), and the names an operator lists in ``TPM_SERVICE_HOSTS``
  (comma-separated ``name`` or ``name:port``: a reverse proxy's public name,
  as the proxy forwards it).

A ``Host`` that names an allowed host without a port (raw clients send
that) is accepted: it cannot point anywhere but here. Until the service is
bound, nothing is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

HOSTS_VARIABLE = "TPM_SERVICE_HOSTS"
"""More ``Host`` values the service answers to (a reverse proxy's public name)."""


class HostCheck:
    """An ASGI middleware: refuse (400) a request whose ``Host`` is not one this service serves."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.allowed: frozenset[str] = frozenset()

    def serve(self, url: str, more: Iterable[str] = ()) -> None:
        """Answer to ``url``'s host and port (all loopback names when it is loopback), and to ``more``
        (``host`` or ``host:port`` values, or URLs)."""
        self.allowed = frozenset(served_hosts(url, more))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
            if not self.allows(host):
                if scope["type"] == "http":
                    await _refuse(send, host)
                return
        await self.app(scope, receive, send)

    def allows(self, host: str) -> bool:
        """``host`` (a ``Host`` header, lower case) is one this service serves."""
        if host in self.allowed:
            return True
        names_a_port = ":" in host.rsplit("]", 1)[-1]
        return bool(host) and not names_a_port and any(value.rsplit(":", 1)[0] == host for value in self.allowed)


def served_hosts(url: str, more: Iterable[str] = ()) -> set[str]:
    """``host:port`` values (lower case) a service reached at ``url`` answers to."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else (parts.hostname or "")
    names = LOOPBACK_NAMES if host in LOOPBACK_NAMES else (host,)
    allowed = {f"{name}:{port}" for name in names}
    for value in more:
        value = value.strip().lower()
        if value:
            allowed.add(urlsplit(value).netloc if "://" in value else value)
    return allowed


async def _refuse(send: Any, host: str) -> None:
    body = json.dumps({"error": {"message": f"this service does not answer to Host {host[:100]!r}",
                                 "type": "invalid_request_error", "param": None, "code": "InvalidHost"}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
