"""The model store: versions of models, kept as deduplicated chunks and manifests.

Layout under the store root (``$TPM_HOME/store`` unless the federation says)::

    chunks/ab/abcd...            tensor slices and small files, by SHA-256
    manifests/<version id>.json  one per version (canonical JSON, hashes to its name)
    models/<name>/versions/<id>  one per version imported under that name (JSON: time, parent)
    models/<name>/tags/<tag>     a version id (``latest`` moves with each import)

An import writes every chunk first and the manifest last (atomically), then
the model's references: a version is visible only once complete, and an
import that dies (disk full, killed) leaves at most unreferenced chunks, which
``gc`` removes. Tensors are cut into chunks of at most ``CHUNK_BYTES``; a
tensor that fits one chunk is loaded straight from its file by memory map.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tpm_fed.protocol.errors import InvalidRequest, ModelLoadError, UnknownModel, UnknownVersion
from tpm_fed.storage.atomic import write_atomically
from tpm_fed.protocol.dtypes import numpy_array, torch_dtype
from tpm_fed.protocol.manifest import Manifest, TensorRecord
from tpm_fed.protocol.names import check_name, path_under
from tpm_fed.storage.store_reader import StoreReader
from tpm_fed.protocol.safetensors_header import SafetensorsFormatError, read_header

CHUNK_BYTES = 256 * 1024 * 1024
"""Largest chunk. Most tensors of even very large models fit one, and so load by memory map."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
LATEST = "latest"


class StoreError(InvalidRequest):
    """A store operation was refused: bad input, or the store is inconsistent."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created: float
    parent: str | None
    tags: list[str]
    nbytes: int


@dataclass(frozen=True)
class TensorChange:
    name: str
    status: str  # changed | added | removed
    nbytes: int
    max_abs_diff: float | None = None


@dataclass(frozen=True)
class Problem:
    version: str
    what: str  # "tensor NAME" or "file NAME" or "manifest"
    detail: str

    def __str__(self) -> str:
        return f"{self.version[:16]}: {self.what}: {self.detail}"


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not enabled)


class ModelStore(StoreReader):
    """The operator's side of the store: import, tag, verify, diff, export, collect garbage."""

    # ----- import -------------------------------------------------------------
    def import_dir(self, model_dir: Path, name: str, tag: str | None = None, *, progress: bool = False) -> str:
        """Import a Hugging Face model directory as a new version of ``name``.

        Returns:
            The version id.

        Raises:
            StoreError: Not a model directory, pickle weights, a malformed
                safetensors file, or a tag already used by another version.
        """
        model_dir = Path(model_dir)
        check_name("model name", name)
        weights = self._check_importable(model_dir)
        if tag is not None:
            self._check_tag_free(name, tag, None)
        entries = {}
        for path in weights:
            try:
                entries[path.name] = read_header(path)
            except SafetensorsFormatError as error:
                raise StoreError(f"{model_dir}: {error}") from None
        total = sum(e.nbytes for tensors, _ in entries.values() for e in tensors)
        tensors: dict[str, TensorRecord] = {}
        with _progress(total, f"importing {name}", progress) as bar:
            for file_name, (file_tensors, _) in entries.items():
                with (model_dir / file_name).open("rb") as handle:
                    for entry in file_tensors:
                        chunk_ids = []
                        handle.seek(entry.start)
                        remaining = entry.nbytes
                        while remaining > 0 or not chunk_ids:
                            data = handle.read(min(CHUNK_BYTES, remaining))
                            chunk_ids.append(self.chunks.put(data)[0])
                            remaining -= len(data)
                            bar.update(len(data))
                        tensors[entry.name] = TensorRecord(
                            file=file_name, dtype=entry.dtype, shape=list(entry.shape), nbytes=entry.nbytes,
                            chunks=chunk_ids,
                        )
        files = {
            path.name: self.chunks.put(path.read_bytes())[0]
            for path in sorted(model_dir.iterdir())
            if path.is_file() and path.suffix in SMALL_FILE_SUFFIXES and not path.name.startswith(".")
        }
        manifest = Manifest(tensors=tensors, files=files,
                            metadata={name_: meta for name_, (_, meta) in entries.items()})
        version = manifest.version_id
        manifest_path = self.root / "manifests" / f"{version}.json"
        if not manifest_path.exists():
            write_atomically(manifest_path, manifest.canonical())
        parent = self._tag_target(name, LATEST)
        record = path_under(self.root, "models", name, "versions", version)
        if not record.exists():
            write_atomically(record, json.dumps({"created": time.time(), "parent": parent}).encode())
        self._set_tag(name, LATEST, version)
        if tag is not None:
            self.tag(name, version, tag)
        return version

    def _check_importable(self, model_dir: Path) -> list[Path]:
        if not model_dir.is_dir():
            raise StoreError(f"{model_dir} is not a directory")
        if not (model_dir / "config.json").is_file():
            raise StoreError(f"{model_dir} is not a model directory (no config.json)")
        weights = sorted(model_dir.glob("*.safetensors"))
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not weights:
            if pickles:
                raise StoreError(
                    f"{model_dir} holds only pickle weights ({', '.join(pickles)}); they are never unpickled "
                    "here. Convert them first: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                    "safe_serialization=True)"
                )
            raise StoreError(f"{model_dir} has no *.safetensors weights")
        if pickles:
            raise StoreError(
                f"{model_dir} holds pickle files beside its safetensors ({', '.join(pickles)}): remove them, "
                "so that what is imported is unambiguous"
            )
        return weights

    # ----- names, tags, versions ---------------------------------------------
    def names(self) -> list[str]:
        folder = self.root / "models"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def versions(self, name: str) -> list[VersionInfo]:
        folder = path_under(self.root, "models", check_name("model name", name), "versions")
        if not folder.exists():
            raise UnknownModel(f"the store has no model {name!r}; it has: {', '.join(self.names()) or 'none'}")
        tags: dict[str, list[str]] = {}
        for tag_path in (self.root / "models" / name / "tags").glob("*"):
            tags.setdefault(tag_path.read_text().strip(), []).append(tag_path.name)
        infos = []
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            record = json.loads(path.read_text())
            nbytes = self.manifest(path.name).nbytes if (self.root / "manifests" / f"{path.name}.json").exists() else 0
            infos.append(VersionInfo(path.name, record["created"], record.get("parent"),
                                     sorted(tags.get(path.name, [])), nbytes))
        return sorted(infos, key=lambda v: v.created)

    def resolve(self, name: str, ref: str | None = None) -> str:
        """A version id from a tag, an id prefix, or (``None``) the latest import."""
        known = [v.version for v in self.versions(name)]
        ref = ref or LATEST
        tagged = self._tag_target(name, ref)
        if tagged is not None:
            return tagged
        matches = [v for v in known if v.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UnknownVersion(f"{name}@{ref} is ambiguous: {', '.join(m[:16] for m in matches)}")
        raise UnknownVersion(
            f"model {name!r} has no version or tag {ref!r}; versions: {', '.join(v[:16] for v in known)}"
        )

    def tag(self, name: str, ref: str, tag: str, *, move: bool = False) -> str:
        """Point ``tag`` at a version; a tag already on another version needs ``move``."""
        try:
            check_name("tag", tag)
        except InvalidRequest as error:
            raise StoreError(str(error)) from None
        version = self.resolve(name, ref)
        if not move:
            self._check_tag_free(name, tag, version)
        self._set_tag(name, tag, version)
        return version

    def _check_tag_free(self, name: str, tag: str, version: str | None) -> None:
        current = self._tag_target(name, tag)
        if tag == LATEST:
            raise StoreError(f"tag {LATEST!r} is kept by the store (it moves with each import)")
        if current is not None and current != version:
            raise StoreError(f"tag {tag!r} of {name!r} is already on version {current[:16]} (use --move)")

    def _tag_target(self, name: str, tag: str) -> str | None:
        # A caller's version reaches here as ``tag``: a name, and its file is inside the store, or it is refused.
        path = path_under(self.root, "models", check_name("model name", name), "tags", check_name("model version", tag))
        return path.read_text().strip() if path.is_file() else None

    def _set_tag(self, name: str, tag: str, version: str) -> None:
        write_atomically(path_under(self.root, "models", name, "tags", tag), version.encode())

    # ----- checks and maintenance --------------------------------------------
    def verify(self, versions: list[str] | None = None, *, progress: bool = False) -> list[Problem]:
        """Re-hash every chunk the versions use; each problem names the tensor or file."""
        if versions is None:
            versions = [p.stem for p in (self.root / "manifests").glob("*.json")]
        problems: list[Problem] = []
        checked: dict[str, str | None] = {}
        manifests = {}
        for version in versions:
            try:
                manifests[version] = self.manifest(version)
            except (ModelLoadError, UnknownVersion) as error:
                problems.append(Problem(version, "manifest", str(error)))
        total = sum(m.nbytes for m in manifests.values())
        with _progress(total, "verifying", progress) as bar:
            for version, manifest in manifests.items():
                items = [(f"tensor {n}", t.chunks) for n, t in manifest.tensors.items()]
                items += [(f"file {n}", [c]) for n, c in manifest.files.items()]
                for what, chunk_ids in items:
                    for chunk_id in chunk_ids:
                        if chunk_id not in checked:
                            checked[chunk_id] = self.chunks.rehash(chunk_id)
                        actual = checked[chunk_id]
                        if actual is None:
                            problems.append(Problem(version, what, f"chunk {chunk_id[:16]} is missing"))
                        elif actual != chunk_id:
                            problems.append(Problem(version, what, f"chunk {chunk_id[:16]} is corrupt"))
                    if what.startswith("tensor"):
                        bar.update(manifest.tensors[what[len("tensor "):]].nbytes)
        return problems

    def gc(self) -> tuple[int, int]:
        """Remove chunks no manifest references; returns (chunks, bytes) removed."""
        referenced: set[str] = set()
        for path in (self.root / "manifests").glob("*.json"):
            try:
                referenced |= Manifest.parse(path.read_bytes(), path.stem).chunk_ids()
            except ValueError:
                raise StoreError(f"manifest {path.stem[:16]} is corrupt: fix it (or remove it) before gc") from None
        removed = freed = 0
        for chunk_id in list(self.chunks.all_ids()):
            if chunk_id not in referenced:
                freed += self.chunks.remove(chunk_id)
                removed += 1
        return removed, freed

    def stored_bytes(self) -> int:
        return sum(self.chunks.path(c).stat().st_size for c in self.chunks.all_ids())

    def diff(self, a: str, b: str) -> list[TensorChange]:
        """Tensors that differ between versions ``a`` and ``b`` (ids), with the largest change."""
        first, second = self.manifest(a), self.manifest(b)
        changes = []
        for name in sorted(set(first.tensors) | set(second.tensors)):
            left, right = first.tensors.get(name), second.tensors.get(name)
            if left is None:
                changes.append(TensorChange(name, "added", right.nbytes))
            elif right is None:
                changes.append(TensorChange(name, "removed", left.nbytes))
            elif left.chunks != right.chunks:
                changes.append(TensorChange(name, "changed", right.nbytes, self._max_abs_diff(left, right)))
        return changes

    def _max_abs_diff(self, left: TensorRecord, right: TensorRecord) -> float | None:
        if left.shape != right.shape or left.dtype != right.dtype:
            return None
        import numpy as np

        try:
            first, second = (numpy_array(b"".join(self.chunks.read(c) for c in r.chunks), r.dtype) for r in (left, right))
        except KeyError:  # a dtype numpy cannot hold (float8)
            return None
        return float(np.max(np.abs(first.astype(np.float64) - second.astype(np.float64))))

    def export(self, version: str, out_dir: Path, *, progress: bool = False) -> Path:
        """Write a plain Hugging Face directory back, tensors byte-identical."""
        import torch
        from safetensors.torch import save_file

        manifest = self.manifest(version)
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise StoreError(f"{out_dir} exists and is not empty")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, chunk_id in manifest.files.items():
            (out_dir / name).write_bytes(self.chunks.read(chunk_id))
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        with _progress(manifest.nbytes, "exporting", progress) as bar:
            for name, record in manifest.tensors.items():
                raw = bytearray(b"".join(self.chunks.read(c) for c in record.chunks))
                tensor = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                by_file.setdefault(record.file, {})[name] = tensor.view(torch_dtype(record.dtype)).reshape(record.shape)
                bar.update(record.nbytes)
        for file_name, tensors in by_file.items():
            save_file(tensors, out_dir / file_name, metadata=manifest.metadata.get(file_name) or None)
        return out_dir


__all__ = ["CHUNK_BYTES", "ModelStore", "Problem", "StoreError", "TensorChange", "VersionInfo"]
