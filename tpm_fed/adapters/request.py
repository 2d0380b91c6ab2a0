"""An embedding request (inference mode 2): the caller's data through their adapters and the shared core."""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from tpm_fed.request import ServingRequest, UsageBound
from tpm_fed.tensors import TensorData


class EmbeddingRequest(ServingRequest):
    """Map inputs to core embeddings, run the core on them, and apply a head.

    Attributes:
        inputs: One tensor per item: ``[positions, in_features]``, or ``[in_features]``
            for an input module that makes its own tokens (it unflattens).
        input_module: Registered adapter ``NAME[@VERSION]`` mapping an input to
            ``[tokens, hidden_size]``.
        head: Registered adapter applied to the core's final hidden states;
            without one, the hidden states are returned.
        pool: Reduce the positions before the head: ``none``, ``last`` or ``mean``.
        input_code, head_code: The caller's own functions instead of registered
            adapters (serialized by Globus Compute's serializer; own sites only).
    """

    kind: Literal["embed"] = "embed"
    inputs: list[TensorData] = Field(min_length=1)
    input_module: str | None = None
    head: str | None = None
    pool: Literal["none", "last", "mean"] = "none"
    input_code: str | None = None
    head_code: str | None = None

    tier: ClassVar[str] = "embedding"

    @model_validator(mode="after")
    def _one_input_module(self) -> Self:
        if (self.input_module is None) == (self.input_code is None):
            raise ValueError("give exactly one of input_module (a registered adapter) or input_code")
        if self.head is not None and self.head_code is not None:
            raise ValueError("give at most one of head or head_code")
        for index, tensor in enumerate(self.inputs):
            if len(tensor.shape) not in (1, 2):
                raise ValueError(f"input {index} has shape {list(tensor.shape)}; give [positions, features] or [features]")
        return self

    @property
    def item_count(self) -> int:
        return len(self.inputs)

    @property
    def runs_user_code(self) -> bool:
        return self.input_code is not None or self.head_code is not None

    def usage_bound(self, tokens_per_row: int = 1) -> UsageBound:
        """Core positions (each input row makes ``tokens_per_row`` tokens) and no generation."""
        rows = sum(t.shape[0] if len(t.shape) == 2 else 1 for t in self.inputs)
        return UsageBound(rows * tokens_per_row, 0)
