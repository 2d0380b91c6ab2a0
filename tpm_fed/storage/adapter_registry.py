"""The adapter registry: named, versioned input modules and output heads, shared by users.

Each version is a folder ``NAME/VERSION/`` holding ``adapter.json`` (the
architecture) and ``weights.safetensors``; the version id is the SHA-256 of
both, so the same adapter registered twice is one version, and a replica
that loads it can check it got exactly what the caller named. Registering
checks the weights against the architecture first: a registered adapter
always loads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tpm_fed.protocol.adapter_architecture import Architecture
from tpm_fed.protocol.errors import AdapterMismatch, UnknownAdapter
from tpm_fed.protocol.names import check_name, path_under
from tpm_fed.protocol.versions import VERSION_ID_LENGTH
from tpm_fed.storage.atomic import write_atomically
from tpm_fed.storage.chunks import sha256
from tpm_fed.protocol.safetensors_header import SafetensorsFormatError, parse_header

NAME_PATTERN = r"^[A-Za-z0-9][\w.-]{0,63}$"


class AdapterRecord(BaseModel):
    """One registered adapter version.

    Attributes:
        name: Adapter name.
        version: Content hash of architecture and weights.
        architecture: The allow-listed layer stack.
        registered_at: Unix time of registration.
        description: What it maps from and to, for other users.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: str
    architecture: Architecture
    registered_at: float
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class AdapterRegistry:
    """Adapters under one folder (the federation's ``store/adapters``).

    Args:
        root: The registry folder; created on first registration.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def register(self, name: str, architecture: Architecture, weights: dict[str, Any] | Path,
                 description: str = "") -> AdapterRecord:
        """Add a version of adapter ``name`` (or find the identical one already there).

        Args:
            weights: Named tensors (torch or numpy), or a ``.safetensors`` file.

        Raises:
            AdapterMismatch: The weights do not fit the architecture, or are not safetensors.
        """
        import re

        if not re.match(NAME_PATTERN, name):
            raise AdapterMismatch(f"adapter name {name!r} must be letters, digits, '_', '-' or '.' (64 at most)")
        blob = _weights_blob(weights)
        architecture.out_features  # noqa: B018 - checks the widths chain up
        architecture.check_weights(_shapes(blob))
        arch_json = architecture.model_dump_json()
        version = sha256(arch_json.encode() + blob)[:VERSION_ID_LENGTH]
        folder = self.root / name / version
        if (folder / "adapter.json").is_file():
            return self._read(folder)
        record = AdapterRecord(name=name, version=version, architecture=architecture,
                               registered_at=time.time(), description=description)
        write_atomically(folder / "weights.safetensors", blob)
        write_atomically(folder / "adapter.json", record.model_dump_json(indent=2).encode())  # last: marks it complete
        return record

    def resolve(self, ref: str) -> AdapterRecord:
        """``NAME`` (newest version) or ``NAME@VERSION-PREFIX`` to one version.

        Raises:
            UnknownAdapter: No such name, or no version with that prefix (the known ones are listed).
            InvalidRequest: The name or version is not a name (a path is refused).
        """
        name, _, prefix = ref.partition("@")
        check_name("adapter", name)  # a caller's text: a name, never a path
        if prefix:
            check_name("adapter version", prefix)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(sorted({r.name for r in self.all()})) or "none registered"
            raise UnknownAdapter(f"no adapter named {name!r}; known: {known}")
        if not prefix:
            return versions[-1]
        matches = [r for r in versions if r.version.startswith(prefix)]
        if len(matches) != 1:
            listed = ", ".join(r.version for r in versions)
            problem = "no" if not matches else "more than one"
            raise UnknownAdapter(f"adapter {name!r} has {problem} version {prefix!r}; versions: {listed}")
        return matches[0]

    def versions(self, name: str) -> list[AdapterRecord]:
        """Versions of ``name``, oldest first."""
        folder = path_under(self.root, name)
        if not folder.is_dir():
            return []
        records = [self._read(v) for v in folder.iterdir() if (v / "adapter.json").is_file()]
        return sorted(records, key=lambda r: r.registered_at)

    def all(self) -> list[AdapterRecord]:
        if not self.root.is_dir():
            return []
        return [r for name in sorted(p.name for p in self.root.iterdir()) for r in self.versions(name)]

    def weights_path(self, record: AdapterRecord) -> Path:
        return self.root / record.name / record.version / "weights.safetensors"

    def _read(self, folder: Path) -> AdapterRecord:
        return AdapterRecord.model_validate_json((folder / "adapter.json").read_text())


def verify_version(record: AdapterRecord, blob: bytes) -> None:
    """Refuse weights whose hash is not the version the caller named.

    Raises:
        AdapterMismatch: The files changed since registration.
    """
    actual = sha256(record.architecture.model_dump_json().encode() + blob)[:VERSION_ID_LENGTH]
    if actual != record.version:
        raise AdapterMismatch(f"adapter {record.ref}: its files hash to {actual}; they changed after registration")


def _weights_blob(weights: dict[str, Any] | Path) -> bytes:
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        data = path.read_bytes()
        try:
            _shapes(data)
        except SafetensorsFormatError:
            raise AdapterMismatch(f"{path} is not a safetensors file (pickled weights are not accepted)") from None
        return data
    import torch
    from safetensors.torch import save

    tensors = {name: (t if torch.is_tensor(t) else torch.as_tensor(t)).detach().cpu().contiguous()
               for name, t in weights.items()}
    return save(tensors)


def _shapes(blob: bytes) -> dict[str, tuple[int, ...]]:
    entries, _ = parse_header(blob, "adapter weights")
    return {entry.name: entry.shape for entry in entries}

