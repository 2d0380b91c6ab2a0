"""Resolve ``name[@version]`` to the exact model version a replica must load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tpm_fed.federation import Federation
from tpm_fed.protocol.encoder_config import EncoderConfig, read_encoder_config
from tpm_fed.protocol.errors import InvalidRequest, ModelLoadError, UnknownVersion
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.points import PointCatalog, catalog_from_config
from tpm_fed.protocol.requests import GenerationRequest, ModelRef, UsageBound
from tpm_fed.storage.store_reader import StoreReader
from tpm_fed.protocol.validation import check_context
from tpm_fed.protocol.versions import VersionCache
from tpm_fed.store import ModelStore


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to its current version, plus what requests are checked against."""

    spec: ModelSpec
    context_length: int


class ModelCatalog:
    """The federation's models, with their version ids computed from disk."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self._versions = VersionCache()
        self._points: dict[str, PointCatalog] = {}
        self._encoders: dict[str, EncoderConfig] = {}
        self._resolved: dict[str, tuple[object, ResolvedModel]] = {}

    def for_federation(self, federation: Federation) -> ModelCatalog:
        """The same catalog over a changed federation, keeping what it learned (versions are content
        hashes and points are per version, so neither goes stale when the file changes)."""
        catalog = ModelCatalog(federation)
        catalog._versions, catalog._points, catalog._encoders = self._versions, self._points, self._encoders
        catalog._resolved = self._resolved
        return catalog

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """Pin ``ref`` to a version.

        Raises:
            UnknownModel: No model of that name.
            UnknownVersion: ``ref.version`` is not a prefix of the model's version.
            ModelLoadError: The model directory is missing or has no config.
        """
        config = self.federation.model(ref.name)
        if config.store:
            return self._resolve_stored(config, ref)
        config_file = config.path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(
                f"model {ref.name!r}: {config.path} is not a model directory (no config.json)"
            )
        version = self._versions.version_of(config.path)
        if ref.version is not None and not version.startswith(ref.version):
            raise UnknownVersion(
                f"model {ref.name!r} has no version {ref.version!r}; available: {version}"
            )
        # The version covers config.json, so what is read from it and the spec built from it hold
        # while the version and the federation's entry (the same object until the file is reloaded) do.
        cached = self._resolved.get(ref.name)
        if cached is not None and cached[0] is config and cached[1].spec.version == version:
            return cached[1]
        context = json.loads(config_file.read_text()).get("max_position_embeddings", 0)
        spec = ModelSpec(
            name=config.name,
            version=version,
            path=str(config.path),
            backend=config.backend,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            accelerators=config.accelerators,
        )
        resolved = ResolvedModel(spec=spec, context_length=int(context))
        self._resolved[ref.name] = (config, resolved)
        return resolved

    def _resolve_stored(self, config, ref: ModelRef) -> ResolvedModel:
        store = ModelStore(self.federation.store)
        version = store.resolve(config.name, ref.version)
        context = store.config_json(version).get("max_position_embeddings", 0)
        spec = ModelSpec(
            name=config.name, version=version, path=str(store.root), backend=config.backend,
            dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size, accelerators=config.accelerators,
            source="store",
        )
        return ResolvedModel(spec=spec, context_length=int(context))

    def config_json(self, spec: ModelSpec) -> dict:
        """The model version's ``config.json``."""
        if spec.source == "store":
            return ModelStore(self.federation.store).config_json(spec.version)
        return json.loads((Path(spec.path) / "config.json").read_text())

    def resolve_name(self, text: str) -> ResolvedModel:
        """Pin ``NAME`` or ``NAME@VERSION``, as the HTTP API names a model."""
        return self.resolve(ModelRef.parse(text))

    def model_file(self, spec: ModelSpec, name: str) -> bytes | None:
        """A file of the model version (``tokenizer_config.json``...), or None when it has none."""
        if spec.source == "store":
            store = StoreReader(self.federation.store)
            chunk = store.manifest(spec.version).files.get(name)
            return None if chunk is None else store.chunks.read(chunk)
        path = Path(spec.path) / name
        return path.read_bytes() if path.is_file() else None

    def hidden_size(self, spec: ModelSpec) -> int:
        return int(self.config_json(spec)["hidden_size"])

    def points(self, spec: ModelSpec) -> PointCatalog:
        """Every hookable point of ``spec``'s architecture (probed once per version, on ``meta``)."""
        if spec.version not in self._points:
            self._points[spec.version] = catalog_from_config(None, config=self.config_json(spec))
        return self._points[spec.version]

    def encoder(self, spec: ModelSpec) -> EncoderConfig:
        """The pooling, normalization and limits of an encoder version (read once per version).

        Raises:
            ModelLoadError: The model is not an encoder folder (an ``encode`` request to a language model).
        """
        if spec.version not in self._encoders:
            if spec.source == "store":
                raise ModelLoadError(f"model {spec.name!r}: encoder models are served from their folder, "
                                     "not from the model store")
            self._encoders[spec.version] = read_encoder_config(Path(spec.path), spec.name)
        return self._encoders[spec.version]

    def encode_bound(self, request, model: ResolvedModel) -> UsageBound:
        """What an :class:`~tpm_fed.protocol.encoding.EncodeRequest` may use at most on ``model``
        (the worker refuses a text over the context by its exact tokens).

        Raises:
            InvalidRequest: ``model`` does not serve ``encode`` (a language model).
            ModelLoadError: Its folder is not an encoder's.
        """
        kinds = self.federation.model(model.spec.name).kinds
        if request.kind not in kinds:
            raise InvalidRequest(f"model {model.spec.name!r} is not an encoder model (it serves {', '.join(kinds)}); "
                                 "encode requests go to a model whose kinds list encode")
        encoder = self.encoder(model.spec)
        return request.usage_bound(encoder.max_tokens, encoder.dimensions)

    def check(self, request: GenerationRequest, model: ResolvedModel) -> None:
        """Refuse what can be refused before any site is involved."""
        check_context(request.max_new_tokens, model.context_length, model=model.spec.name)
