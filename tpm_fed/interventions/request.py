"""A trace request (inference mode 3): prompts, intervention steps and analyses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpm_fed.interventions.spec import AttentionLens, AttentionPatterns, LogitLens, Point, Save, Step
from tpm_fed.request import ServingRequest, UsageBound, check_prompts, prompt_token_bound
from tpm_fed.tensors import TENSOR_HEADER_BYTES

class PythonHook(BaseModel):
    """The caller's own function, run at a point: ``fn(tensor) -> tensor | None``.

    It gets the whole ``[prompts, positions, *features]`` tensor at every forward
    call (the prompt pass and each generated token); a tensor it returns
    replaces the activation.

    Arbitrary code runs only on a site the caller's project owns (``byo``); the
    broker refuses it everywhere else before anything runs. ``code`` is the
    function as Globus Compute's serializer packs it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    point: str
    code: str = Field(min_length=1)

    @field_validator("point")
    @classmethod
    def _parsable(cls, point: str) -> str:
        return str(Point.parse(point))

    @classmethod
    def of(cls, point: str, function: Callable[[Any], Any]) -> Self:
        from globus_compute_sdk.serialize import ComputeSerializer

        return cls(point=point, code=ComputeSerializer().serialize(function))


class TraceRequest(ServingRequest):
    """Run prompts through the model while reading and writing its activations.

    Attributes:
        prompts: One or more prompts, run in one batch (patching copies between them).
        steps: Saves and edits, applied in order at each point.
        logit_lens: Decode every layer's residual stream (top-k tokens per position).
        attention_lens: Decode each head's contribution to the residual stream.
        attention_patterns: Return attention weights (computed with eager attention).
        max_new_tokens: 0 runs one forward pass; more generates greedily with the
            edits in place (steps with ``generated=True`` also edit the new tokens).
        python_hooks: The caller's own functions (own sites only).
    """

    kind: Literal["trace"] = "trace"
    prompts: list[str] = Field(min_length=1)
    steps: list[Step] = Field(default_factory=list)
    logit_lens: LogitLens | None = None
    attention_lens: AttentionLens | None = None
    attention_patterns: AttentionPatterns | None = None
    max_new_tokens: int = Field(default=0, ge=0)
    python_hooks: list[PythonHook] = Field(default_factory=list)

    tier: ClassVar[str] = "intermediary"

    _prompts_not_empty = field_validator("prompts")(classmethod(lambda cls, prompts: check_prompts(prompts)))

    @model_validator(mode="after")
    def _prompt_indexes(self) -> Self:
        count = len(self.prompts)
        for index, step in enumerate(self.steps):
            named = [*(step.prompts or []), *([step.source] if step.op == "patch" else [])]
            for prompt in named:
                if prompt >= count:
                    raise ValueError(f"step {index} ({step.op}): prompt {prompt} is out of range; "
                                     f"the request has prompts 0..{count - 1}")
        keys = [step.key for step in self.steps if isinstance(step, Save)]
        if len(keys) != len(set(keys)):
            raise ValueError("two save steps have the same name; give each a distinct name")
        return self

    @property
    def runs_user_code(self) -> bool:
        return bool(self.python_hooks)

    def usage_bound(self) -> UsageBound:
        return UsageBound(prompt_token_bound(self.prompts), self.max_new_tokens * len(self.prompts))

    def result_bytes(self, catalog, prompt_tokens: list[int], item_bytes: int = 4) -> int:
        """Bytes of the tensors this request returns, for prompts of these token counts.

        With exact token counts (on the replica) this is the result's size; with
        upper bounds (on the client) it bounds it.
        """
        total = 0
        layers = len(catalog.layers)
        for step in self.steps:
            if not isinstance(step, Save):
                continue
            point = step.address
            width = math.prod(catalog.features(point))
            for prompt in step.prompts or range(len(self.prompts)):
                rows = len(step.positions) if step.positions else prompt_tokens[prompt]
                rows += self.max_new_tokens if step.generated else 0
                total += rows * width * item_bytes + TENSOR_HEADER_BYTES
        for prompt_len in prompt_tokens:
            if self.logit_lens is not None:
                positions = len(self.logit_lens.positions or []) or prompt_len
                total += len(self.logit_lens.layers or catalog.layers) * positions * self.logit_lens.top_k * 8
            if self.attention_lens is not None:
                heads = len(self.attention_lens.heads or []) or max((a.heads for a in catalog.attention.values()), default=0)
                total += (len(self.attention_lens.layers or catalog.layers) * heads
                          * len(self.attention_lens.positions) * self.attention_lens.top_k * 8)
            if self.attention_patterns is not None:
                heads = max((a.heads for a in catalog.attention.values()), default=0)
                total += len(self.attention_patterns.layers or range(layers)) * heads * prompt_len**2 * 4
            total += 3 * TENSOR_HEADER_BYTES
        return total
