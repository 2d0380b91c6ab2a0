"""The federation file: which sites exist and which models they serve.

It is operator-owned YAML, validated as a whole when loaded; every mistake is
reported with the field it concerns. Relative model paths are resolved
against the folder holding the file, so a federation folder can be moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpm_fed.errors import FederationConfigError, UnknownModel
from tpm_fed.models.spec import BackendChoice, DType
from tpm_fed.request import describe_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SiteConfig(_Strict):
    """One place where replicas run.

    Attributes:
        name: Unique site name.
        kind: ``local``: the Globus Compute endpoint engine, embedded in the
            caller's process tree (one machine, no cloud).
        workers: Worker processes, each able to hold one warm replica.
        max_batch_requests: Most requests coalesced into one task.
        batch_linger_ms: How long a request waits for companions when a
            worker is free (0 sends at once).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["local"] = "local"
    workers: int = Field(default=1, ge=1, le=256)
    max_batch_requests: int = Field(default=64, ge=1, le=4096)
    batch_linger_ms: float = Field(default=1.0, ge=0.0, le=1000.0)


class ModelConfig(_Strict):
    """One model the federation serves.

    Attributes:
        name: Unique model name users ask for.
        path: Hugging Face model directory (relative to the federation file).
        backend: ``auto`` (vLLM where installed and the architecture is
            supported, else torch), ``torch`` or ``vllm``.
        dtype: Load dtype.
        tensor_parallel_size: GPUs per vLLM replica (one worker per replica).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    backend: BackendChoice = "auto"
    dtype: DType = "float32"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)


class Federation(_Strict):
    """Sites and models, as described by the operator."""

    name: str = "embedded"
    sites: list[SiteConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        for kind, items in (("sites", self.sites), ("models", self.models)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names: {', '.join(duplicates)}")
        return self

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read and validate a federation file; model paths become absolute."""
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FederationConfigError(f"federation file not found: {path}") from None
        except yaml.YAMLError as error:
            raise FederationConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise FederationConfigError(f"{path}: expected a mapping at the top level")
        try:
            federation = cls.model_validate(raw)
        except ValidationError as error:
            raise FederationConfigError(f"{path}: {describe_validation_error(error)}") from None
        return federation.with_paths_relative_to(path.parent)

    def with_paths_relative_to(self, folder: Path) -> Self:
        models = [
            m.model_copy(update={"path": (folder / m.path).resolve()}) for m in self.models
        ]
        return self.model_copy(update={"models": models})

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise UnknownModel(f"unknown model {name!r}; the federation serves: {known}")
