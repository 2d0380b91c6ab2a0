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


def _fingerprint(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of each defining file (module folders' too)."""
    stats = []
    for path in defining_files(model_dir):
        st = path.stat()
        stats.append((path.relative_to(model_dir).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sorted(stats))


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


class VersionCache:
    """Remembers version ids until a file's size or mtime changes."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def version_of(self, model_dir: Path) -> str:
        model_dir = model_dir.resolve()
        fingerprint = _fingerprint(model_dir)
        with self._lock:
            cached = self._known.get(model_dir)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        version = hash_model_dir(model_dir)
        with self._lock:
            self._known[model_dir] = (fingerprint, version)
        return version
