"""What a replica needs to load one exact model version."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from tpm_fed.protocol.backends import BACKENDS, Backend, BackendChoice  # noqa: F401 - re-exported (written there)

DType = Literal["float32", "bfloat16", "float16"]


class ModelSpec(BaseModel):
    """A model resolved to one version, ready to ship to a worker.

    Attributes:
        name: Model name in the federation.
        version: Version id the caller was promised; the worker checks it.
        path: Directory in Hugging Face layout, as seen from the worker.
        backend: ``torch``, ``vllm`` or ``auto`` (vLLM where it can, else torch); ``encoder`` for
            ``encode`` requests (set from the kinds table, not by the operator).
        dtype: Weights are loaded in this dtype.
        tensor_parallel_size: Ranks each layer is split over (accelerators on GPU sites,
            processes on CPU sites); vLLM keeps a tensor-parallel group on one node.
        pipeline_parallel_size: Stages the layers are split into, one rank group each; a
            replica has ``tensor_parallel_size x pipeline_parallel_size`` ranks, over as many
            nodes as the site needs for them (:func:`tpm_fed.broker.nodes.nodes_needed`).
        accelerators: Accelerators the replica uses, all ranks together (0: it runs on CPU, a rank
            per process).
        source: ``dir``: ``path`` is a Hugging Face directory whose content hash is
            the version; ``store``: ``path`` is a model store root, and the
            version is a manifest id in it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    path: str
    backend: BackendChoice = "auto"
    dtype: DType = "float32"
    tensor_parallel_size: int = Field(default=1, ge=1, le=1024)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=1024)
    accelerators: int = Field(default=0, ge=0)
    source: Literal["dir", "store"] = "dir"

    @property
    def world_size(self) -> int:
        """Ranks one replica runs: every tensor-parallel rank of every pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def key(self) -> tuple[str, str, str]:
        """Replica cache key: one replica per model version and backend choice."""
        return (self.name, self.version, self.backend)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)
