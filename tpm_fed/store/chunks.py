"""Content-addressed chunks: each distinct byte string stored once, named by its SHA-256.

Writes go to a temporary file in the same folder, then ``os.replace``: a chunk
is either whole under its name or absent, even if the disk fills or two
imports write the same chunk at once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

READ_BLOCK = 8 * 1024 * 1024


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root

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
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".incoming-", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(staging, target)
        except BaseException:
            os.unlink(staging)
            raise
        return chunk_id, True

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
        return size
