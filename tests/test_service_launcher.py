"""The embedded default keeps its two commands: ``tpm submit`` finds or starts the home's service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.homes import demo_home
from tpm_fed.home import TpmHome

TPM = str(Path(sys.executable).with_name("tpm"))


def _tpm(home: TpmHome, *args: str, idle_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TPM_HOME": str(home.root), "TPM_SERVICE_IDLE_TIMEOUT": str(idle_s)}
    env.pop("TPM_URL", None)
    return subprocess.run([TPM, *args], capture_output=True, text=True, env=env, timeout=240)


def _submit(home: TpmHome, **options) -> dict:
    done = _tpm(home, "submit", "The cell", "--max-tokens", "8", "--json", **options)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _service_pid(home: TpmHome) -> int:
    return json.loads((home.root / "service.json").read_text())["pid"]


def _stop(home: TpmHome) -> None:
    _tpm(home, "service", "stop")


def _session(leader: int) -> list[int]:
    """Every other process in ``leader``'s session (Linux)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != leader and os.getsid(int(entry.name)) == leader:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_the_second_submit_finds_a_warm_replica(tmp_path, demo_model_dir):
    home = demo_home(tmp_path / "home", demo_model_dir)
    try:
        first, second = _submit(home), _submit(home)
        assert not first["replica"]["warm"]
        assert second["replica"]["warm"] and second["timings"]["load_s"] == 0
        assert second["replica"]["replica_id"] == first["replica"]["replica_id"]
        assert oct((home.root / "service.json").stat().st_mode & 0o777) == "0o600"
        status = _tpm(home, "service", "status")
        assert status.returncode == 0 and json.loads((home.root / "service.json").read_text())["token"] in status.stdout
        workers = _descendants(_service_pid(home))
        assert workers, "the service runs its site's engine in child processes"
    finally:
        _stop(home)
    # Stopped gracefully: its site's processes stopped with it and its file is gone.
    log = (home.root / "service.log").read_text()
    assert "tpm: service stopped" in log
    # tpm serve's process, and only it, keeps its started site's heap out of the collector's full passes.
    assert "long-lived objects are kept out of the collector's full passes" in log
    assert not (home.root / "service.json").exists()
    assert not [p for p in workers if _alive_within(p, 20)]


def _descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (from /proc: children of each task)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


def _alive_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` still runs after ``seconds`` (and is not a zombie waiting to be reaped)."""
    if _gone(pid, seconds):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_service_is_replaced_on_the_next_submit(tmp_path, demo_model_dir):
    home = demo_home(tmp_path / "home", demo_model_dir)
    try:
        _submit(home)
        old = _service_pid(home)
        left = _session(old)  # its site's interchange and workers (they hold the replica)
        assert left
        os.kill(old, signal.SIGKILL)
        assert _gone(old, 10)
        assert (home.root / "service.json").exists()  # stale: its process is gone
        assert all(not _gone(pid, 0.1) for pid in left)  # orphaned, still holding the replica's memory
        assert _submit(home)["usage"]["completion_tokens"] > 0
        assert _service_pid(home) != old
        assert all(_gone(pid, 10) for pid in left)  # the new service's start ended them
    finally:
        _stop(home)


@pytest.mark.slow
def test_two_concurrent_first_calls_start_one_service(tmp_path, demo_model_dir):
    home = demo_home(tmp_path / "home", demo_model_dir)
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: _submit(home), range(2)))
        assert all(r["usage"]["completion_tokens"] > 0 for r in results)
        log = (home.root / "service.log").read_text()
        assert log.count("tpm: serving") == 1, log
    finally:
        _stop(home)


@pytest.mark.slow
def test_an_idle_service_stops_itself(tmp_path, demo_model_dir):
    home = demo_home(tmp_path / "home", demo_model_dir)
    _tpm(home, "submit", "The", "--max-tokens", "1", idle_s=2)
    pid = _service_pid(home)
    assert _gone(pid, 30)
    assert not (home.root / "service.json").exists()
    assert "no request for" in (home.root / "service.log").read_text()


@pytest.mark.slow
def test_a_service_started_by_a_long_lived_caller_stops_promptly(tmp_path, demo_model_dir, monkeypatch):
    """A notebook's Client starts the service as its own child; `tpm service stop` elsewhere still ends it."""
    from tpm_fed.connection import ensure_service

    home = demo_home(tmp_path / "home", demo_model_dir)
    monkeypatch.delenv("TPM_URL", raising=False)
    address = ensure_service(home, idle_timeout_s=120)  # started from this process: its parent
    started = time.monotonic()
    stopped = _tpm(home, "service", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the service (pid {address.pid})" in stopped.stdout
    assert time.monotonic() - started < 30  # not the 40 s a zombie would hold it for
