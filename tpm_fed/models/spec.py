"""What a replica needs to load one exact model version."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

Backend = Literal["torch"]
DType = Literal["float32", "bfloat16", "float16"]


class ModelSpec(BaseModel):
    """A model resolved to one version, ready to ship to a worker.

    Attributes:
        name: Model name in the federation.
        version: Version id the caller was promised; the worker checks it.
        path: Directory in Hugging Face layout, as seen from the worker.
        backend: Which backend serves it.
        dtype: Weights are loaded in this dtype.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    path: str
    backend: Backend = "torch"
    dtype: DType = "float32"

    @property
    def key(self) -> tuple[str, str]:
        """Replica cache key: one replica per model version."""
        return (self.name, self.version)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)
