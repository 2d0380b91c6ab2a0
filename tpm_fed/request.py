"""Requests: what a caller asks for, validated once, where it enters.

A request is plain typed data. It crosses to endpoint workers as JSON-ready
dicts (:meth:`GenerationRequest.to_wire`), so the wire format stays readable
and does not depend on pickling our classes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tpm_fed.errors import InvalidRequest


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per problem, naming the field, for CLI and exceptions."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "request"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


class ModelRef(BaseModel):
    """A model name with an optional version (a version id prefix or a tag)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``NAME`` or ``NAME@VERSION``."""
        name, _, version = text.partition("@")
        if not name.strip():
            raise InvalidRequest(f"model: {text!r} has no model name")
        if "@" in text and not version.strip():
            raise InvalidRequest(f"model: {text!r} has an empty version after '@'")
        return cls(name=name.strip(), version=version.strip() or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


SPECIAL_TOKENS_ALLOWANCE = 4
"""Tokens a tokenizer may add around a prompt (BOS, EOS, ...)."""


@dataclass(frozen=True)
class UsageBound:
    """The most a request can use: what its service units are reserved for."""

    prompt_tokens: int
    completion_tokens: int
    result_bytes: int = 0


def prompt_token_bound(prompts: list[str]) -> int:
    """No byte-level or SentencePiece tokenizer makes more tokens than bytes (plus specials)."""
    return sum(len(p.encode()) + SPECIAL_TOKENS_ALLOWANCE for p in prompts)


def check_prompts(prompts: list[str]) -> list[str]:
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty")
    return prompts


class ServingRequest(BaseModel):
    """What every request shares: the model, who pays, where it may run.

    Attributes:
        model: Which model, optionally pinned to a version.
        project: Project to charge; needed only for callers in several projects.
        location: Where the caller or its data is (a location of the federation's
            latency table); the federation's default location otherwise.
        site: Run only on this site (placement still checks it is allowed).
        request_id: Unique id, used for the request log and billing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelRef
    project: str | None = None
    location: str | None = None
    site: str | None = None
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)

    tier: ClassVar[str] = "query"
    """The price tier and model mode this kind of request uses."""

    def usage_bound(self) -> UsageBound:
        raise NotImplementedError

    @property
    def item_count(self) -> int:
        """Prompts (or inputs) the request holds."""
        return len(self.prompts)

    @property
    def runs_user_code(self) -> bool:
        """True when the request carries the caller's own Python code (own sites only)."""
        return False

    @classmethod
    def create(cls, model: str | ModelRef, **fields: Any) -> Self:
        """Build and validate a request; raise :class:`InvalidRequest` on bad input."""
        ref = ModelRef.parse(model) if isinstance(model, str) else model
        try:
            return cls(model=ref, **fields)
        except ValidationError as error:
            raise InvalidRequest(describe_validation_error(error)) from None

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise InvalidRequest(describe_validation_error(error)) from None


class GenerationRequest(ServingRequest):
    """Prompt in, text out (inference mode 1, query only).

    Attributes:
        prompts: One or more non-empty prompts, answered together.
        max_new_tokens: Upper bound on generated tokens per prompt.
        min_new_tokens: The end-of-sequence token is suppressed until this
            many tokens are out (fixed-length outputs for benchmarks).
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass, in (0, 1].
        seed: Makes sampling reproducible on the same backend.
        stop: Generation ends at the first of these strings (not returned).
        backend: Pin a backend (``torch`` or ``vllm``); the model's setting by default.
    """

    kind: Literal["generate"] = "generate"
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(default=32, gt=0)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    backend: Literal["auto", "torch", "vllm"] | None = None

    _prompts_not_empty = field_validator("prompts")(classmethod(lambda cls, prompts: check_prompts(prompts)))

    def usage_bound(self) -> UsageBound:
        return UsageBound(prompt_token_bound(self.prompts), self.max_new_tokens * len(self.prompts))

    @model_validator(mode="after")
    def _min_within_max(self) -> Self:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, prompts: str | list[str], model: str | ModelRef, **params: Any) -> Self:  # type: ignore[override]
        """Build and validate a request; raise :class:`InvalidRequest` on bad input."""
        return super().create(model, prompts=[prompts] if isinstance(prompts, str) else prompts, **params)


def request_from_wire(data: dict[str, Any]) -> ServingRequest:
    """Rebuild any kind of request from its wire form (its ``kind`` says which).

    Raises:
        InvalidRequest: Unknown kind, or the fields do not validate.
    """
    from tpm_fed.adapters.request import EmbeddingRequest
    from tpm_fed.interventions.request import TraceRequest

    kinds: dict[str, type[ServingRequest]] = {
        "generate": GenerationRequest, "trace": TraceRequest, "embed": EmbeddingRequest,
    }
    kind = data.get("kind", "generate")
    if kind not in kinds:
        raise InvalidRequest(f"kind: unknown request kind {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind].from_wire(data)
