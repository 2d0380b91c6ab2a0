"""The model store as a worker reads it: manifests and verified chunks, nothing written.

The store's layout is part of the contract: the operator's tools
(:class:`tpm_fed.store.ModelStore`, which imports, tags and collects
garbage) write it, and an endpoint worker reads a version from it on a
shared file system. Both go through this class, so they agree on the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from tpm_fed.storage.chunks import ChunkStore
from tpm_fed.protocol.errors import ModelLoadError, UnknownVersion
from tpm_fed.protocol.manifest import Manifest
from tpm_fed.protocol.names import is_name, path_under


class StoreReader:
    """A store folder: ``manifests/VERSION.json`` and content-addressed ``chunks/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunks = ChunkStore(self.root / "chunks")

    def manifest(self, version: str) -> Manifest:
        """The version's manifest, checked to hash to ``version``.

        Raises:
            UnknownVersion: The store has no such version.
            ModelLoadError: The manifest does not hash to its id.
        """
        if not is_name(version):  # a tag file's content, or a caller's text: never a path
            raise UnknownVersion(f"the store has no manifest for version {version[:16]!r}")
        path = path_under(self.root, "manifests", f"{version}.json")
        try:
            return Manifest.parse(path.read_bytes(), version)
        except FileNotFoundError:
            raise UnknownVersion(f"the store has no manifest for version {version[:16]}") from None
        except ValueError as error:
            raise ModelLoadError(f"version {version[:16]}: {error}") from None

    def config_json(self, version: str) -> dict:
        """The version's ``config.json``."""
        manifest = self.manifest(version)
        return json.loads(self.chunks.read(manifest.files["config.json"]))
