"""Content-addressed chunks: each distinct byte string stored once, named by its SHA-256.

Writes go to a temporary file in the same folder, then ``os.replace``: a chunk
is either whole under its name or absent, even if the disk fills or two
imports write the same chunk at once.

Chunks are never written again once stored, so a chunk whose bytes were
hashed is recorded with its file's size, mtime and inode (``verified/``).
:meth:`ChunkStore.check` re-hashes only when that record no longer matches
the file: any write to a chunk (a flipped byte, a truncation) is caught
without re-reading every byte of every healthy chunk at every load. Decay
that changes no metadata is what ``tpm models verify`` (a full re-hash) is for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from tpm_fed.storage.atomic import write_atomically

READ_BLOCK = 8 * 1024 * 1024


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.verified_root = root.parent / "verified"

    def path(self, chunk_id: str) -> Path:
        return self.root / chunk_id[:2] / chunk_id

    def has(self, chunk_id: str) -> bool:
        return self.path(chunk_id).exists()

    def put(self, data: bytes | memoryview) -> tuple[str, bool]:
        """Store ``data``; returns its id and whether it was new."""
        chunk_id = sha256(data)
        target = self.path(chunk_id)
        if target.exists() and target.stat().st_size == len(data):
            return chunk_id, False
        write_atomically(target, data)
        self._mark_verified(chunk_id)
        return chunk_id, True

    def _marker(self, chunk_id: str) -> Path:
        return self.verified_root / chunk_id[:2] / chunk_id

    def _mark_verified(self, chunk_id: str) -> None:
        write_atomically(self._marker(chunk_id), _stat_key(self.path(chunk_id)).encode())

    def check(self, chunk_id: str) -> str:
        """``ok``, ``missing`` or ``corrupt``; re-hashes only a chunk changed since last verified."""
        path = self.path(chunk_id)
        try:
            current = _stat_key(path)
        except FileNotFoundError:
            return "missing"
        try:
            if self._marker(chunk_id).read_text() == current:
                return "ok"
        except FileNotFoundError:
            pass
        actual = self.rehash(chunk_id)
        if actual is None:
            return "missing"
        if actual != chunk_id:
            return "corrupt"
        self._mark_verified(chunk_id)
        return "ok"

    def read(self, chunk_id: str) -> bytes:
        return self.path(chunk_id).read_bytes()

    def rehash(self, chunk_id: str) -> str | None:
        """The SHA-256 of the stored bytes, or None if the chunk is missing."""
        try:
            with self.path(chunk_id).open("rb") as handle:
                digest = hashlib.sha256()
                while block := handle.read(READ_BLOCK):
                    digest.update(block)
                return digest.hexdigest()
        except FileNotFoundError:
            return None

    def all_ids(self) -> Iterator[str]:
        if not self.root.exists():
            return
        for folder in self.root.iterdir():
            if folder.is_dir():
                for path in folder.iterdir():
                    if not path.name.startswith("."):
                        yield path.name

    def remove(self, chunk_id: str) -> int:
        path = self.path(chunk_id)
        size = path.stat().st_size
        path.unlink()
        self._marker(chunk_id).unlink(missing_ok=True)
        return size
