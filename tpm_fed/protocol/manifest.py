"""A version's manifest: every tensor's chunks and every other file, hashed as a whole.

The version id is the SHA-256 of the manifest's canonical JSON (sorted keys,
no whitespace), so two imports of identical content get the same id, and a
manifest changed by a single byte no longer matches its name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Self

from pydantic import BaseModel, ConfigDict

FORMAT = "tpm-store/1"


class TensorRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str  # the safetensors file it came from (shards stay shards on export)
    dtype: str
    shape: list[int]
    nbytes: int
    chunks: list[str]


class Manifest(BaseModel):
    """Everything that defines a model version.

    Attributes:
        tensors: Tensor name -> where its bytes are (chunk hashes, in order).
        files: Other file name (config, tokenizer...) -> chunk hash of its bytes.
        metadata: Safetensors metadata per weights file (e.g. ``{"format": "pt"}``).
        parent: The version this one was imported after (for diffs; not hashed
            into the content, so identical content keeps one id).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    tensors: dict[str, TensorRecord]
    files: dict[str, str]
    metadata: dict[str, dict[str, str]] = {}

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    @property
    def version_id(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def chunk_ids(self) -> set[str]:
        return {c for t in self.tensors.values() for c in t.chunks} | set(self.files.values())

    @classmethod
    def parse(cls, data: bytes, expected_id: str) -> Self:
        """Read a stored manifest; it must hash to the id it is stored under."""
        manifest = cls.model_validate(json.loads(data))
        if manifest.version_id != expected_id:
            raise ValueError(f"manifest {expected_id[:16]} does not hash to its id (corrupt or truncated)")
        return manifest

