"""``tpm serve``: one long-lived process that owns the service's parts (:mod:`tpm_fed.service.assembly`)
and speaks HTTP.

It binds its socket first (port 0 picks a free one), then writes
``$TPM_HOME/service.json`` (URL, token, pid; mode 0600), so a client that
reads the file can connect at once. It stops on SIGINT/SIGTERM, or by
itself after ``idle_timeout_s`` without requests: uvicorn lets requests in
flight finish (up to ``GRACE_S``), then the sites stop with their replicas
and the file is removed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from tpm_fed.home import PRIVATE_UMASK, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.sites.long_lived import tune_collector_in_this_process

logger = logging.getLogger(__name__)

GRACE_S = 30
"""Seconds in-flight requests get to finish when the service is asked to stop."""


@dataclass(frozen=True)
class ServiceOptions:
    """How to run the service.

    Attributes:
        host: Interface to listen on (loopback by default: the local token is a file's secret).
        port: TCP port (0: any free port; the file says which).
        database_url: SQLAlchemy URL of the one ledger (the home's SQLite by default).
        auth: ``local`` (a token in service.json) or ``globus`` (Globus Auth access tokens).
        idle_timeout_s: Stop after this long with no request (None: never).
        operators: Identities that may read every project and use the operator routes
            (``/tpm/v1/admin``). With ``local`` auth the home's owner is one too: the
            home, and so its federation file, is theirs already.
    """

    host: str = "127.0.0.1"
    port: int = 0
    database_url: str | None = None
    auth: str = "local"
    idle_timeout_s: float | None = None
    operators: tuple[str, ...] = ()


def run_service(home: TpmHome, options: ServiceOptions) -> None:
    """Serve until stopped (blocks)."""
    from tpm_fed.service.app import build_app, serve_at
    from tpm_fed.service.assembly import ServiceAssembly
    from tpm_fed.service.connections import ConnectionLimits, service_server
    from tpm_fed.service.hosts import HOSTS_VARIABLE

    os.umask(PRIVATE_UMASK)  # what the service and its sites write is its owner's alone
    home.make_private()  # and what an older version left open to other users is fixed, with a warning
    home.ensure_embedded_default(progress=True)
    # This process lives as long as its sites: their heap leaves the collector's full passes, and its
    # youngest generation is collected less often (only here).
    tune_collector_in_this_process(report=lambda line: print(line, flush=True))
    auth, token = _authenticator(options)
    service = ServiceAssembly(home, database_url=options.database_url, callers=_callers(auth))
    operators = frozenset(options.operators) | ({service.engine.owner} if auth.mode == "local" else set())
    app = build_app(service, auth, operators=operators)
    activity = Activity(app)
    listener = socket.create_server((options.host, options.port), reuse_port=False)
    host, port = listener.getsockname()[:2]
    url = f"http://{_url_host(host)}:{port}"
    # Workers post streamed text and early answers here, and ask for requests that may join their
    # batch; behind a reverse proxy, or bound to every interface, the operator names the route in.
    # Set once, here: no request's Host header ever decides where a task's back channel goes.
    extra_hosts = tuple(os.environ.get(HOSTS_VARIABLE, "").split(","))
    serve_at(app, url, worker_url=os.environ.get("TPM_SERVICE_WORKER_URL") or None, hosts=extra_hosts)
    limits = ConnectionLimits.from_environment()
    app.timeout_s, app.deadline_s = limits.body_timeout_s, limits.body_deadline_s  # app: its BodyLimits
    server = service_server(activity, limits, timeout_graceful_shutdown=GRACE_S)
    info = {"url": url, "token": token, "pid": os.getpid(), "auth": auth.mode, "started_at": time.time()}
    write_service_file(home, info)
    if options.idle_timeout_s:
        threading.Thread(target=_stop_when_idle, args=(server, activity, options.idle_timeout_s),
                         kwargs={"busy": lambda: service.batches.busy},
                         name="tpm-idle", daemon=True).start()
    print(f"tpm: serving {home.root} at {url} (auth: {auth.mode})", flush=True)
    if token:
        print(f"tpm: the bearer token is in {service_file(home)} (tpm service status prints it)", flush=True)
        # As Jupyter does: the token rides in the fragment, which browsers never send to the server.
        # Only to a terminal: started in the background, stdout is service.log, and no log holds a secret.
        if sys.stdout.isatty():
            print(f"tpm: web page (this link signs you in): {url}/#token={token}", flush=True)
        else:
            print("tpm: tpm service status prints the web page's sign-in link", flush=True)
    # uvicorn re-raises the stop signal after its own graceful shutdown; with the
    # default SIGTERM action that kills the process before the sites below stop
    # (their worker processes would outlive it). Raising SystemExit instead lets
    # the ``finally`` run.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server.run(sockets=[listener])
    finally:
        service.close()  # in reverse of its building: stores, the runner's lines in flight, then the engine
        remove_service_file(home, os.getpid())
        print("tpm: service stopped", flush=True)


def _exit_on_signal(number: int, _frame: Any) -> None:
    raise SystemExit(128 + number)


def _authenticator(options: ServiceOptions) -> tuple[Any, str | None]:
    from tpm_fed.service.auth import GlobusTokens, LocalToken

    if options.auth == "local":
        token = secrets.token_urlsafe(32)
        return LocalToken(token, LocalUser().current()), token
    if options.auth == "globus":
        client_id = os.environ.get("TPM_SERVICE_CLIENT_ID")
        secret = os.environ.get("TPM_SERVICE_CLIENT_SECRET")
        if not client_id or not secret:
            raise SystemExit("tpm serve --auth globus needs TPM_SERVICE_CLIENT_ID and TPM_SERVICE_CLIENT_SECRET "
                             "(the service's Globus Auth confidential client)")
        # What `tpm login` is told (GET /tpm/v1/auth): the native app users log in with, and the scope.
        return GlobusTokens(client_id, secret, login_client_id=os.environ.get("TPM_SERVICE_LOGIN_CLIENT_ID"),
                            scope=os.environ.get("TPM_SERVICE_SCOPE")), None
    raise SystemExit(f"unknown auth mode {options.auth!r}; use local or globus")


def _callers(auth: Any) -> Any:
    """How the runtime learns a caller's groups and submits as them (dependent tokens with Globus Auth)."""
    from tpm_fed.service.callers import GlobusCallers, LocalCallers

    return GlobusCallers(auth.dependent_tokens) if auth.mode == "globus" else LocalCallers()


class Activity:
    """An ASGI wrapper that knows when the last request ended and how many are running."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.running = 0
        self.last_seen = time.monotonic()
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self.running -= 1
                self.last_seen = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.running else time.monotonic() - self.last_seen


def _stop_when_idle(server: Any, activity: Activity, idle_timeout_s: float, busy: Any = lambda: False) -> None:
    while not server.should_exit:
        idle = activity.idle_for()
        if idle >= idle_timeout_s and busy():  # a batch in progress is work, with or without callers
            idle = 0.0
            activity.last_seen = time.monotonic()
        if idle >= idle_timeout_s:
            print(f"tpm: no request for {idle:.0f} s; stopping", flush=True)
            server.should_exit = True
            return
        time.sleep(min(1.0, idle_timeout_s - idle + 0.05))


def service_file(home: TpmHome):
    return home.root / "service.json"


def write_service_file(home: TpmHome, info: dict[str, Any]) -> None:
    """Write atomically, readable by the home's owner only (it holds the token)."""
    path = service_file(home)
    staging = path.with_name(f".service.{os.getpid()}.json")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(info, handle)
    os.replace(staging, path)


def remove_service_file(home: TpmHome, pid: int) -> None:
    """Remove the file if it is still this process's (a newer service may have replaced it)."""
    path = service_file(home)
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
