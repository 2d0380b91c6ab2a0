"""Requests of every kind: what a caller asks for, validated once, where it enters.

A request is plain typed data. It crosses to endpoint workers as JSON-ready
dicts (:meth:`GenerationRequest.to_wire`), so the wire format stays readable
and does not depend on pickling our classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpm_fed.protocol.generation import (  # noqa: F401 - re-exported: the contract's requests, in one place
    describe_validation_error,
    ModelRef,
    REQUEST_ID_PATTERN,
    SPECIAL_TOKENS_ALLOWANCE,
    UsageBound,
    prompt_token_bound,
    check_prompts,
    MAX_SEED,
    MIN_TEMPERATURE,
    MAX_TEMPERATURE,
    MAX_NEW_TOKENS,
    Temperature,
    TopP,
    Seed,
    NewTokens,
    MAX_TOP_K,
    TopK,
    MinP,
    RepetitionPenalty,
    CALLER_PRIORITY_BOUND,
    BATCH_PRIORITY,
    CallerPriority,
    Priority,
    TokenId,
    ServingRequest,
    GenerationRequest,
    VLLM_EXTENSION_DEFAULTS,
)
from tpm_fed.protocol.interventions import AttentionLens, AttentionPatterns, LogitLens, Point, Save, Step
from tpm_fed.protocol.names import check_reference
from tpm_fed.protocol.tensors import TENSOR_HEADER_BYTES, TensorData


class PythonHook(BaseModel):
    """The caller's own function, run at a point: ``fn(tensor) -> tensor | None``.

    It gets the whole ``[prompts, positions, *features]`` tensor at every forward
    call (the prompt pass and each generated token); a tensor it returns
    replaces the activation.

    Arbitrary code runs only on a site the caller's project owns (``byo``); the
    broker refuses it everywhere else before anything runs. ``code`` is the
    function as Globus Compute's serializer packs it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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
    max_new_tokens: NewTokens = Field(default=0, ge=0)
    python_hooks: list[PythonHook] = Field(default_factory=list)

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
            features = catalog.features(step.address)
            for prompt in step.prompts or range(len(self.prompts)):
                rows = len(step.positions) if step.positions else prompt_tokens[prompt]
                rows += self.max_new_tokens if step.generated else 0
                shape = (rows, *features) if step.reduce is None else step.reduce.shape((rows, *features))
                total += math.prod(shape) * item_bytes + TENSOR_HEADER_BYTES
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


class EmbeddingRequest(ServingRequest):
    """Map inputs to core embeddings, run the core on them, and apply a head.

    The inputs are either the caller's tensors through an input module, or
    ``texts``, which the core's own tokenizer and token embeddings make into
    sequences (the final hidden states of text, as ``/v1/embeddings`` serves).

    Attributes:
        inputs: One tensor per item: ``[positions, in_features]``, or ``[in_features]``
            for an input module that makes its own tokens (it unflattens).
        texts: Text items instead of tensors (no input module).
        input_module: Registered adapter ``NAME[@VERSION]`` mapping an input to
            ``[tokens, hidden_size]``.
        head: Registered adapter applied to the core's final hidden states;
            without one, the hidden states are returned.
        pool: Reduce the positions before the head: ``none``, ``last`` or ``mean``.
        input_code, head_code: The caller's own functions instead of registered
            adapters (serialized by Globus Compute's serializer; own sites only).
    """

    kind: Literal["embed"] = "embed"
    inputs: list[TensorData] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)
    input_module: str | None = None
    head: str | None = None
    pool: Literal["none", "last", "mean"] = "none"
    input_code: str | None = None
    head_code: str | None = None

    _texts_not_empty = field_validator("texts")(classmethod(lambda cls, texts: check_prompts(texts)))
    _adapters_are_names = field_validator("input_module", "head")(classmethod(
        lambda cls, ref: ref if ref is None else check_reference("adapter", ref)))

    @model_validator(mode="after")
    def _one_input_module(self) -> Self:
        if bool(self.inputs) == bool(self.texts):
            raise ValueError("give either inputs (tensors, with an input module) or texts")
        if self.texts and (self.input_module is not None or self.input_code is not None):
            raise ValueError("texts go through the core's own token embeddings; give no input module")
        if self.inputs and (self.input_module is None) == (self.input_code is None):
            raise ValueError("give exactly one of input_module (a registered adapter) or input_code")
        if self.head is not None and self.head_code is not None:
            raise ValueError("give at most one of head or head_code")
        for index, tensor in enumerate(self.inputs):
            if len(tensor.shape) not in (1, 2):
                raise ValueError(f"input {index} has shape {list(tensor.shape)}; give [positions, features] or [features]")
        return self

    @property
    def item_count(self) -> int:
        return len(self.inputs) or len(self.texts)

    @property
    def runs_user_code(self) -> bool:
        return self.input_code is not None or self.head_code is not None

    def usage_bound(self, tokens_per_row: int = 1) -> UsageBound:
        """Core positions (each input row makes ``tokens_per_row`` tokens; a text, its token bound) and no generation."""
        rows = sum(t.shape[0] if len(t.shape) == 2 else 1 for t in self.inputs)
        return UsageBound(rows * tokens_per_row + prompt_token_bound(self.texts), 0)
