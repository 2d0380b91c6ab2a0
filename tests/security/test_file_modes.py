"""The home's files are its owner's alone: no other local user reads the token, the log or the database.

Issue 24, defect 4: the home was 0755, ``service.log`` and ``tpm.db`` 0644, and the service started in
the background printed the ``#token=`` sign-in link into ``service.log``, so any local user (``nobody``
here) read an operator's token from the log and callers' prompts from the database. Here a home made
that way (an existing one: 0755 folders, 0644 files) is started the documented way (``tpm submit``,
which starts the service in the background) and then: the home and every file in it have no group or
other bits, the start said it fixed them, the log holds no token, and ``nobody`` reads none of it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.homes import demo_home
from tpm_fed.home import TpmHome

TPM = str(Path(sys.executable).with_name("tpm"))


def _tpm(home: TpmHome, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TPM_HOME": str(home.root), "TPM_SERVICE_IDLE_TIMEOUT": "120"}
    env.pop("TPM_URL", None)
    # The umask most users have: what the service writes must not depend on it.
    return subprocess.run(["sh", "-c", 'umask 022 && exec "$@"', "tpm", TPM, *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _open_to_others(root: Path) -> list[str]:
    found = [] if not root.stat().st_mode & 0o077 else [f". {oct(root.stat().st_mode & 0o777)}"]
    for folder, subfolders, files in os.walk(root):
        for name in [*subfolders, *files]:
            mode = (Path(folder) / name).lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{(Path(folder) / name).relative_to(root)} {oct(mode & 0o777)}")
    return found


def _as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *command], capture_output=True, text=True, timeout=30)


@pytest.fixture
def open_home(demo_model_dir):
    """A home as an older version left it, in a folder other users can reach (pytest's own tmp is 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="tpm-modes-", dir="/tmp"))
    parent.chmod(0o755)
    home = demo_home(parent / "home", demo_model_dir)
    for folder, subfolders, files in os.walk(home.root):
        Path(folder).chmod(0o755)
        for name in files:
            (Path(folder) / name).chmod(0o644)
    (home.root / "service.log").write_text("an older service's log\n")
    (home.root / "service.log").chmod(0o644)
    yield home
    _tpm(home, "service", "stop")
    shutil.rmtree(parent, ignore_errors=True)


def test_the_started_service_leaves_nothing_readable_by_other_users(open_home):
    home = open_home
    assert _as_nobody("cat", str(home.root / "service.log")).returncode == 0  # the test can tell: open before

    done = _tpm(home, "submit", "The cell", "--max-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    token = json.loads((home.root / "service.json").read_text())["token"]
    assert (home.root / "tpm.db").exists() and (home.root / "sites").exists()  # written after the start too

    assert _open_to_others(home.root) == []
    log = (home.root / "service.log").read_text()
    assert token not in log and "#token=" not in log
    assert "were readable by other users" in log  # the start said what it fixed

    for secret in ("service.json", "service.log", "tpm.db"):
        attempt = _as_nobody("cat", str(home.root / secret))
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, (secret, attempt)
    assert _as_nobody("ls", str(home.root)).returncode != 0

    status = _tpm(home, "service", "status")  # the owner still gets the sign-in link, on their terminal
    assert status.returncode == 0 and f"#token={token}" in status.stdout


def test_a_home_made_by_the_launcher_is_private_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        home = TpmHome(tmp_path / "fresh" / "home")
        home.create()
        assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
        (home.root / "tpm.db").write_bytes(b"")
        assert home.make_private() == [home.root / "tpm.db"]
        assert _open_to_others(home.root) == []
        assert home.make_private() == []  # nothing left to fix: no warning at the next start
    finally:
        os.umask(previous)
