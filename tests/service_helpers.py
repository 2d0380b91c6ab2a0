"""Servers the service tests run for real on loopback: the service itself, and Globus Auth's stand-in.

- :class:`ServiceThread` runs the service's ASGI app under uvicorn in a thread
  of the test process (sharing the session's assembly and its warm replica);
  :func:`served` does it for an assembly behind a fresh local token, and
  :func:`openai_client` is the official client pointed at it.
- :func:`tpm_in_process` runs a ``tpm`` command in the test process (so
  ``responses`` sees the SDK's requests) and then stops the home's service the
  command may have started, so no service outlives its test.
- :class:`GlobusAuthStandIn` answers Globus Auth's token introspection route
  (``POST /v2/oauth2/token/introspect``, HTTP basic auth with the service's
  client id and secret) from a table of tokens, so globus-sdk's real
  ``ConfidentialAppAuthClient`` talks HTTP to it exactly as it would to
  auth.globus.org.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


class ServiceThread:
    """``with ServiceThread(app) as url:`` serves ``app`` on a free loopback port, as ``tpm serve`` does
    (its connection limits: ``limits``, the defaults if None)."""

    def __init__(self, app: Any, limits: Any = None) -> None:
        from tpm_fed.service.app import fastapi_app, serve_at
        from tpm_fed.service.connections import ConnectionLimits, service_server

        self.server = service_server(app, limits or ConnectionLimits())
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        # Tests serve one runtime (one back-channel hub) from several apps in turn, where tpm serve
        # serves it once: the hub's worker URL goes back to the previous server's when this one stops,
        # or later tasks would post their streams to a closed port.
        self.hub = fastapi_app(app).state.channels
        self.previous_worker_url = self.hub.worker_url
        serve_at(app, self.url)  # as tpm serve does once it is bound
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.hub.worker_url == self.url:
            self.hub.worker_url = self.previous_worker_url


@contextmanager
def served(service: Any, identity: str | None = None) -> Iterator[tuple[str, str]]:
    """What ``service`` (a :class:`~tpm_fed.service.assembly.ServiceAssembly`) built, served on loopback behind
    a fresh local token for ``identity`` (its engine's owner by default): ``with served(service) as (url, token):``."""
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    with ServiceThread(build_app(service, LocalToken(token, identity or service.engine.owner))) as url:
        yield url, token


@contextmanager
def served_with_globus(service: Any, client_id: str, secret: str,
                       tokens: dict[str, dict]) -> Iterator[tuple[str, Any, GlobusAuthStandIn]]:
    """``service`` (a :class:`~tpm_fed.service.assembly.ServiceAssembly`) served on loopback with Globus Auth identities (``--auth globus``), introspected by a
    stand-in of Globus Auth over ``tokens`` (token -> :func:`token_answer`):
    ``with served_with_globus(...) as (url, auth, auth_server):``."""
    import globus_sdk

    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import GlobusTokens

    with GlobusAuthStandIn(client_id, secret, tokens) as auth_server:
        auth = GlobusTokens(client_id, auth_client=globus_sdk.ConfidentialAppAuthClient(
            client_id, secret, base_url=auth_server.url))
        with ServiceThread(build_app(service, auth)) as url:
            yield url, auth, auth_server


def openai_client(url: str, token: str) -> Any:
    """The official ``openai`` client on a service's OpenAI routes (no retries: a test sees every answer)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)


class GlobusAuthStandIn:
    """Globus Auth's routes the service calls, over a token table.

    - ``POST /v2/oauth2/token/introspect``: the table's answer for a token.
    - ``GET /v2/oauth2/authorize``: a browser sent to log in, as if ``login_as``
      had logged in and consented: back to ``redirect_uri`` with a code and the state.
    - ``POST /v2/oauth2/token`` (``authorization_code``): a code, once, for a new
      access token for the client's own scope, added to the table.

    Args:
        client_id, client_secret: The only credentials it accepts (the service's confidential client).
        tokens: Access token -> the introspection answer (``active``, ``exp``, ``aud``, ``username``...).
        login_as: The username a browser login gets.
    """

    def __init__(self, client_id: str, client_secret: str, tokens: dict[str, dict[str, Any]],
                 login_as: str = "ana@uchicago.edu") -> None:
        self.client_id, self.client_secret, self.tokens = client_id, client_secret, tokens
        self.login_as = login_as
        self.introspections = 0
        self.codes: dict[str, str] = {}  # code -> the redirect_uri it was issued for
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path, _, query = self.path.partition("?")
                if path.rstrip("/") != "/v2/oauth2/authorize":
                    return self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                asked = {k: v[0] for k, v in parse_qs(query).items()}
                if asked.get("client_id") != stand_in.client_id or asked.get("response_type") != "code":
                    return self._reply(400, {"errors": [{"code": "BAD_REQUEST"}]})
                code = secrets.token_urlsafe(12)
                stand_in.codes[code] = asked["redirect_uri"]
                self.send_response(302)
                self.send_header("Location", f"{asked['redirect_uri']}?code={code}&state={asked['state']}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.rstrip("/")
                if path not in ("/v2/oauth2/token/introspect", "/v2/oauth2/token"):
                    return self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                expected = base64.b64encode(f"{stand_in.client_id}:{stand_in.client_secret}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    return self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if path.endswith("/token"):
                    return self._exchange(form)
                stand_in.introspections += 1
                self._reply(200, stand_in.tokens.get(form.get("token", ""), {"active": False}))

            def _exchange(self, form: dict[str, str]) -> None:
                redirect_uri = stand_in.codes.pop(form.get("code", ""), None)  # a code works once
                if form.get("grant_type") != "authorization_code" or redirect_uri != form.get("redirect_uri"):
                    return self._reply(401, {"error": "invalid_grant"})
                token = "browser-" + secrets.token_urlsafe(12)
                stand_in.tokens[token] = token_answer(stand_in.login_as, stand_in.client_id)
                self._reply(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                                  "scope": f"https://auth.globus.org/scopes/{stand_in.client_id}/all",
                                  "resource_server": stand_in.client_id, "other_tokens": []})

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> GlobusAuthStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()


def token_answer(username: str, audience: str, *, lifetime_s: float = 3600, active: bool = True) -> dict[str, Any]:
    """What Globus Auth's introspection says of a token (the fields the service reads)."""
    now = time.time()
    return {"active": active, "username": username, "sub": f"sub-{username}", "aud": [audience],
            "exp": int(now + lifetime_s), "iat": int(now), "scope": f"https://auth.globus.org/scopes/{audience}/all"}


def tpm_in_process(home_root: Any, monkeypatch: Any, *args: str) -> Any:
    """Run ``tpm *args`` against the home at ``home_root`` in this process; stop its service after.

    A federation change (``tpm functions register``) goes through the home's
    service, which the command starts and which would otherwise idle for 30
    minutes holding the home's database and an older federation.
    """
    from click.testing import CliRunner

    from tpm_fed.cli import main

    monkeypatch.setenv("TPM_HOME", str(home_root))
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        stopped = CliRunner().invoke(main, ["service", "stop"], catch_exceptions=False)
        assert stopped.exit_code == 0, stopped.output
