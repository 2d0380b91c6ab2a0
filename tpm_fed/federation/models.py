"""A model the federation serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from tpm_fed.federation.base import Name, _Strict
from tpm_fed.federation.renamed_keys import _modes_renamed
from tpm_fed.protocol.kinds import KindName
from tpm_fed.protocol.model import BackendChoice, DType


class ModelConfig(_Strict):
    """One model the federation serves.

    Attributes:
        name: Unique model name users ask for.
        path: Hugging Face model directory (relative to the federation file).
        store: Versions come from the federation's model store instead
            (``tpm models add``); then there is no ``path``.
        backend: ``auto`` (vLLM where installed and the architecture is
            supported, else torch), ``torch`` or ``vllm``.
        dtype: Load dtype.
        tensor_parallel_size: Ranks each layer is split over (GPUs on GPU sites, processes on
            CPU sites); best at most a node's accelerators (vLLM keeps it on one node).
        pipeline_parallel_size: Stages the layers are split into; with more ranks than a node
            has, the replica spans nodes (:func:`tpm_fed.broker.nodes.nodes_needed`).
        accelerators: Accelerators one replica needs, all its nodes together: 0 (runs on CPU)
            or one per rank, ``tensor_parallel_size x pipeline_parallel_size``.
        memory_gb: Memory one replica needs (informational for operators).
        kinds: Request kinds this model serves (``generate``, ``embed``, ``trace``; ``encode`` for an
            encoder model, a sentence-transformers folder).
        sites: Sites that may host it (all, when empty).
    """

    name: str = Name
    path: Path | None = None
    store: bool = False
    backend: BackendChoice = "auto"
    dtype: DType = "float32"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=1024)
    accelerators: int = Field(default=0, ge=0)
    memory_gb: float = Field(default=1.0, gt=0)
    kinds: list[KindName] = Field(default_factory=lambda: ["generate"], min_length=1)
    sites: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _modes_were_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "modes" in data:
            raise ValueError(_modes_renamed(str(data.get("name")), data["modes"]))
        return data

    @property
    def world_size(self) -> int:
        """Ranks one replica runs (tensor parallel x pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _one_accelerator_per_rank(self) -> Self:
        if self.accelerators not in (0, self.world_size):
            raise ValueError(
                f"model {self.name!r}: accelerators is {self.accelerators}, but tensor_parallel_size "
                f"{self.tensor_parallel_size} x pipeline_parallel_size {self.pipeline_parallel_size} makes "
                f"{self.world_size} ranks of one accelerator each: write {self.world_size} (or 0 for CPU)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (not self.store):
            raise ValueError(f"model {self.name!r}: give either a path or store: true")
        return self
