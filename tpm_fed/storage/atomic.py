"""Files written whole or not at all: through a temporary file beside the target, then a rename.

Every file written in place of another goes through here: chunks,
manifests, tags, adapters, the federation file, and a result's tensors saved
to disk (:func:`write_chunks_atomically`, which never holds them whole). A
failed write (a full disk, a read that turns out expired or corrupt) leaves
no partial file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes | memoryview | str) -> None:
    """Write ``data`` to ``path``: whole or absent (``str`` data as UTF-8).

    The file gets the permissions it had, or a new file's (``0o666`` less the umask), not the temporary
    file's owner-only ones.
    """
    write_chunks_atomically(path, [data.encode() if isinstance(data, str) else data])


def write_chunks_atomically(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``path`` one at a time (never joined in memory): whole or absent; the bytes written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    written = 0
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
            os.fchmod(out.fileno(), _mode_for(target))
        os.replace(staging, target)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise
    return written


def write_folder_atomically(folder: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Replace ``folder`` whole with what ``fill`` writes into an empty staging folder beside it: the
    folder is 0700 and every file in it 0600 (libraries write with the process's umask), and a failed
    ``fill`` leaves the old folder as it was and no staging folder behind."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # mkdtemp: 0700
    try:
        fill(staging)
        private_files(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def private_files(folder: Path) -> None:
    """``folder`` 0700 and everything under it 0700 (folders) or 0600 (files)."""
    folder.chmod(0o700)
    for path in folder.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current
