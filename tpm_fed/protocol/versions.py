"""Version ids for model directories: a content hash of what defines the model.

The id covers the weights, the config and the tokenizer, and nothing else
(a README or a stray log does not change what a model computes). Hashing
streams the files, so it reads each byte once and holds little in memory;
:class:`VersionCache` skips the work while no file has changed on disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

VERSION_ID_LENGTH = 16
"""Hex digits shown and matched; 64 bits makes accidental collisions negligible."""

_DEFINING_SUFFIXES = {".safetensors", ".json", ".model", ".txt", ".tiktoken"}
_CHUNK = 4 * 1024 * 1024


def _defines_model(name: str) -> bool:
    return (
        not name.startswith(".")
        and os.path.splitext(name)[1] in _DEFINING_SUFFIXES
        and not name.lower().startswith("readme")
    )


def defining_files(model_dir: Path) -> list[Path]:
    """Files whose bytes define the model, in a stable order.

    An encoder folder (sentence-transformers layout) keeps its pooling in module
    folders named by ``modules.json`` (``1_Pooling/config.json``): their files
    define what it computes too. Other folders' subfolders are not read, so
    their version ids are what they were.
    """
    top = sorted(p for p in model_dir.iterdir() if p.is_file() and _defines_model(p.name))
    return top + [path for folder in _module_folders(model_dir) for path in
                  sorted(p for p in folder.iterdir() if p.is_file() and _defines_model(p.name))]


def _module_folders(model_dir: Path) -> list[Path]:
    """The folders ``modules.json`` names, inside ``model_dir`` (none without one)."""
    import json

    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        paths = sorted({str(module.get("path", "")) for module in modules if isinstance(module, dict)})
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    root = model_dir.resolve()
    folders = [model_dir / path for path in paths if path]
    return [folder for folder in folders if folder.is_dir() and folder.resolve().is_relative_to(root)]


def hash_model_dir(model_dir: Path) -> str:
    """The version id of a model directory (hex, :data:`VERSION_ID_LENGTH` digits)."""
    digest = hashlib.sha256()
    for path in defining_files(model_dir):
        # A file's path in the folder (its name, at the top): the same ids as before module folders counted.
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:VERSION_ID_LENGTH]


def _signature(path: str) -> tuple[int, int, int, int]:
    """What changes whenever a file's (or a folder's list of) content changes: size, mtime, inode, ctime.

    The ctime is set by the kernel on every write, rename and ``utime``, so a file rewritten in place
    and then given back its old mtime still shows a new signature; the inode catches a file replaced
    by another (an editor's or a downloader's rename over it).
    """
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


@dataclass(frozen=True)
class _Known:
    """A version id with the stat signatures it was computed under.

    ``folders`` are the model folder and its module folders: adding, removing or renaming a file in
    one changes the folder's own signature, so the list of defining files need not be read again
    while they hold. ``files`` are the defining files themselves (written in place, a folder's
    signature does not change, a file's does).
    """

    folders: tuple[tuple[str, tuple[int, int, int, int]], ...]
    files: tuple[tuple[str, tuple[int, int, int, int]], ...]
    version: str

    def current(self) -> bool:
        try:
            return all(_signature(path) == sig for path, sig in self.folders) and all(
                _signature(path) == sig for path, sig in self.files)
        except OSError:  # a file gone: read the folder again (which raises what a missing folder raises)
            return False


class VersionCache:
    """Remembers version ids while the stat signatures of the folder and its defining files hold.

    A request costs one ``stat`` per folder and per defining file (no listing, no path resolution,
    no hashing); any change on disk is seen by the next request, which reads the folder again and
    hashes only when a defining file's signature moved.
    """

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()

    def version_of(self, model_dir: Path) -> str:
        key = os.fspath(model_dir)
        with self._lock:
            known = self._known.get(key)
        if known is not None and known.current():
            return known.version
        # Signatures are taken before listing and hashing: a change while they run leaves a newer
        # signature on disk than the one kept, so the next request reads the folder again.
        model_dir = Path(model_dir)
        folders = [model_dir, *_module_folders(model_dir)]
        folder_sigs = tuple((os.fspath(folder), _signature(os.fspath(folder))) for folder in folders)
        file_sigs = tuple((os.fspath(path), _signature(os.fspath(path))) for path in defining_files(model_dir))
        if known is not None and known.files == file_sigs:
            version = known.version  # the folder changed (a README, a log), no defining file did
        else:
            version = hash_model_dir(model_dir)
        with self._lock:
            self._known[key] = _Known(folder_sigs, file_sigs, version)
        return version
