"""Where a caller's service is: ``TPM_URL``/``TPM_TOKEN``, or the home's own, started on first use.

The embedded default keeps its two commands: the first ``tpm submit`` for a
home finds no running service, starts one in the background (``tpm serve``
with an idle timeout, logs in ``$TPM_HOME/service.log``), waits until it
answers, and goes on over HTTP; later calls find it warm. A lock file makes
two concurrent first calls start exactly one service; a ``service.json``
left by a dead process is replaced.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tpm_fed.protocol.errors import SiteError

if TYPE_CHECKING:  # only its paths and create() are used: importing it costs the federation's models
    from tpm_fed.home import TpmHome

START_TIMEOUT_S = 180.0
"""How long a starting service may go without a word in its log before it is given up on.

The first start of a home also trains the demo model, which prints its
progress: on a slow or busy machine that takes minutes, and is not a hang."""

DEFAULT_IDLE_TIMEOUT_S = 1800.0
"""A service started for a home stops after this long without requests."""


@dataclass(frozen=True)
class ServiceAddress:
    url: str
    token: str | None
    pid: int | None = None


def from_environment() -> ServiceAddress | None:
    """``TPM_URL`` (and ``TPM_TOKEN``) name a service, e.g. a research center's shared one."""
    url = os.environ.get("TPM_URL")
    return ServiceAddress(url.rstrip("/"), os.environ.get("TPM_TOKEN")) if url else None


def recorded_service(root: Path) -> ServiceAddress | None:
    """The service ``root/service.json`` names, if its process is alive (whether it answers is not asked).

    The warm ``tpm submit`` stops here: its first request is its health check.
    """
    try:
        info = json.loads((root / "service.json").read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or not isinstance(info.get("url"), str) or not _alive(pid):
        return None
    return ServiceAddress(info["url"], info.get("token"), pid)


def running_service(home: TpmHome) -> ServiceAddress | None:
    """The home's service if its process is alive and answers ``/health``."""
    address = recorded_service(home.root)
    return address if address is not None and healthy(address.url) else None


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers ``GET /health`` with 200.

    The standard library's client, not httpx: a warm ``tpm submit`` checks
    this on every call, and a fresh httpx client costs tens of milliseconds
    (it loads the CA bundle even for plain http).
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout_s)
    try:
        connection.request("GET", f"{parts.path.rstrip('/')}/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def ensure_service(home: TpmHome, *, announce: bool = False, idle_timeout_s: float | None = None) -> ServiceAddress:
    """The home's running service, started in the background if there is none.

    A service started here stops after ``idle_timeout_s`` without requests
    (``TPM_SERVICE_IDLE_TIMEOUT``, else :data:`DEFAULT_IDLE_TIMEOUT_S`).

    Raises:
        SiteError: The service did not come up (the end of its log is in the message).
    """
    address = running_service(home)
    if address is not None:
        return address
    home.create()  # the owner's alone: it will hold the token, the database and the log
    with open(os.open(home.root / "service.lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent first call waits here, then finds the service
        address = running_service(home)
        if address is not None:
            return address
        if idle_timeout_s is None:
            idle_timeout_s = float(os.environ.get("TPM_SERVICE_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT_S))
        return _start(home, announce=announce, idle_timeout_s=idle_timeout_s)


def _start(home: TpmHome, *, announce: bool, idle_timeout_s: float) -> ServiceAddress:
    log = home.root / "service.log"
    if announce:
        print(f"tpm: starting the service for {home.root} (first call: seconds; log: {log})", file=sys.stderr)
    _end_leftovers(home)
    (home.root / "service.json").unlink(missing_ok=True)  # stale: its process is gone
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tpm_fed.service", "--home", str(home.root),
             "--idle-timeout", str(idle_timeout_s)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline, logged = time.monotonic() + START_TIMEOUT_S, _size(log)
    while time.monotonic() < deadline:
        if (size := _size(log)) != logged:  # still making progress (the demo model's training prints it)
            deadline, logged = time.monotonic() + START_TIMEOUT_S, size
        if process.poll() is not None:
            raise SiteError(f"the service for {home.root} exited with status {process.returncode}:\n"
                            f"{_tail(log)}")
        address = running_service(home)
        if address is not None and address.pid == process.pid:
            # A long-lived caller (a notebook's Client, a test) is the service's parent: reap it
            # when it exits, or it stays a zombie, which `tpm service stop` and running_service
            # (both probe the pid) would take for a service still running.
            threading.Thread(target=process.wait, name="tpm-service-reaper", daemon=True).start()
            return address
        time.sleep(0.1)
    process.terminate()
    raise SiteError(f"the service for {home.root} did not answer, nor log progress, for {START_TIMEOUT_S:.0f} s:\n"
                    f"{_tail(log)}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _end_leftovers(home: TpmHome) -> None:
    """Stop what a killed service left running: its sites' interchanges and workers.

    A service stopped any other way stops them itself. Killed, it leaves them
    holding their replicas' memory with nothing to serve; they are in its
    session (it starts as a session leader), so they are found by that. Only
    the caller's own processes are touched, and only on Linux (``/proc``).
    """
    try:
        old = json.loads((home.root / "service.json").read_text()).get("pid")
    except (OSError, ValueError):
        return
    if not isinstance(old, int) or _alive(old) or old == os.getsid(0):
        return
    # The pid may have been reused as another session's id since: only what a site
    # starts (Parsl's interchange, job scripts, worker pool and its children) is ended.
    ours = (b"parsl", b"multiprocessing", str(home.root).encode())
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            if os.getsid(pid) != old or entry.stat().st_uid != os.getuid():
                continue
            if any(mark in (entry / "cmdline").read_bytes() for mark in ours):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
