"""What every serving request shares, and the generation request (prompt in, text out): the contract's
part a caller needs to ask for text.

Kept apart from the other kinds (:mod:`tpm_fed.protocol.requests`, which re-exports all of this) so
that asking for text does not import the intervention and tensor models: a warm ``tpm submit``
spends most of its time importing, and those are most of the contract.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.model import BackendChoice
from tpm_fed.protocol.names import check_name


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

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    version: str | None = None

    # Both become file names in a model store: names, never paths (checked here, where every reference enters).
    _name_is_a_name = field_validator("name")(classmethod(lambda cls, name: check_name("model", name)))
    _version_is_a_name = field_validator("version")(
        classmethod(lambda cls, version: version if version is None else check_name("model version", version)))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``NAME`` or ``NAME@VERSION``.

        Raises:
            InvalidRequest: No name, an empty version, or a name or version that is not a name
                (:data:`~tpm_fed.protocol.names.NAME_PATTERN`: a path is refused here).
        """
        name, _, version = text.partition("@")
        if not name.strip():
            raise InvalidRequest(f"model: {text!r} has no model name")
        if "@" in text and not version.strip():
            raise InvalidRequest(f"model: {text!r} has an empty version after '@'")
        check_name("model", name.strip())
        if version.strip():
            check_name("model version", version.strip())
        return cls(name=name.strip(), version=version.strip() or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
"""A caller may choose a request's id: at most 64 of these characters, as every table keeps ids
(``String(64)``: PostgreSQL refuses a longer one; SQLite would keep it)."""

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


MAX_SEED = 2**63 - 1
"""The largest seed: a signed 64-bit integer, as vLLM's own OpenAI server bounds it. A larger one
(torch's generators take at most 2**64 - 1) used to pass and then raise inside the backend,
failing every request batched with it."""

MIN_TEMPERATURE = 0.01
"""The smallest temperature above 0 (0 is greedy). Dividing logits by less overflows them and
sampling then raises inside the backend (``1e-320``: NaN probabilities in torch); vLLM raises
such a temperature to this same floor with a warning, and it is refused here instead."""

MAX_TEMPERATURE = 2.0
"""The largest temperature, as OpenAI's API bounds it."""

MAX_NEW_TOKENS = 1 << 20
"""The most tokens one prompt may ask for, whatever the model's context (a model whose context is
not known is not checked against it): the usage bound, and so the reservation, stays an ordinary number."""


def _greedy_or_at_least_the_minimum(temperature: float) -> float:
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (smaller ones overflow the "
                         f"model's logits), got {temperature}")
    return temperature


Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE), AfterValidator(_greedy_or_at_least_the_minimum)]
"""0 (greedy), or a temperature in [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`]."""

TopP = Annotated[float, Field(gt=0.0, le=1.0)]
"""Nucleus sampling mass, in (0, 1]."""

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
"""A seed in [0, :data:`MAX_SEED`]."""

NewTokens = Annotated[int, Field(le=MAX_NEW_TOKENS)]
"""A count of tokens to generate per prompt, at most :data:`MAX_NEW_TOKENS` (each field adds its own lower bound)."""

MAX_TOP_K = 1 << 20
"""The largest top_k worth naming (no vocabulary is larger); bounded so it stays an ordinary int64."""


def _top_k_off_or_positive(top_k: int) -> int:
    if top_k < -1:
        raise ValueError(f"must be -1 or 0 (off) or at least 1, got {top_k}")
    return max(top_k, 0)  # one spelling of off, so a request that says -1 sets nothing


TopK = Annotated[int, Field(le=MAX_TOP_K), AfterValidator(_top_k_off_or_positive)]
"""Sample among the k likeliest tokens; 0 or -1 is off (vLLM takes both)."""

MinP = Annotated[float, Field(ge=0.0, le=1.0)]
"""Drop tokens less likely than this share of the likeliest one's probability; 0 is off."""

RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]
"""vLLM's (and transformers') repetition penalty: > 1 discourages tokens already in the prompt or
output, 1 is off. vLLM only asks > 0; 10 bounds it where a larger one is just a token ban."""

CALLER_PRIORITY_BOUND = 1 << 20
"""A caller's own priority is within (-this, this)."""

BATCH_PRIORITY = 1 << 21
"""Added to a batch line's priority (:mod:`tpm_fed.batches.runner`): every batch line is scheduled after
every interactive request, whatever priorities their callers chose."""

CallerPriority = Annotated[int, Field(gt=-CALLER_PRIORITY_BOUND, lt=CALLER_PRIORITY_BOUND)]
"""vLLM's scheduling priority as a caller sends it: lower runs first (arrival breaks ties)."""

Priority = Annotated[int, Field(gt=-CALLER_PRIORITY_BOUND, lt=BATCH_PRIORITY + CALLER_PRIORITY_BOUND)]
"""A request's scheduling priority: the caller's, plus :data:`BATCH_PRIORITY` for a batch line."""

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
"""A token id."""


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

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: ModelRef
    project: str | None = None
    location: str | None = None
    site: str | None = None
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=REQUEST_ID_PATTERN)


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
        temperature: 0 means greedy decoding; otherwise at least :data:`MIN_TEMPERATURE`,
            at most :data:`MAX_TEMPERATURE`.
        top_p: Nucleus sampling mass, in (0, 1].
        seed: Makes sampling reproducible on the same backend; in [0, :data:`MAX_SEED`].
        stop: Generation ends at the first of these strings (not returned).
        backend: Pin a backend (``torch`` or ``vllm``); the model's setting by default.
        add_special_tokens: Let the tokenizer add its special tokens (BOS...) around each
            prompt; off for a prompt rendered from a chat template, which holds them already.
        stream: Send the text back as it is made, where the site can reach the service
            (the service's back channel; see :mod:`functions.back_channel`).

    vLLM's own sampling extensions (its OpenAI server's names and meanings), each off by default;
    docs/sampling.md says which backend takes which:

    Attributes:
        ignore_eos: Generate through end-of-sequence tokens, to exactly ``max_new_tokens``.
        top_k: Sample among the k likeliest tokens (0 or -1: off).
        min_p: Drop tokens less likely than this share of the likeliest (0: off).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1: off).
        stop_token_ids: Also end at these tokens (kept in the output, as vLLM does).
        skip_special_tokens: Leave special tokens out of the text.
        spaces_between_special_tokens: Put spaces between special tokens in the text.
        include_stop_str_in_output: Keep the stop string that ended the text.
        priority: The engine's scheduling priority (lower first), where its scheduler has priorities.
    """

    kind: Literal["generate"] = "generate"
    prompts: list[str] = Field(min_length=1)
    # The bounds are the contract's (validated where a request enters, and again where a worker reads
    # it): a value out of them once passed, raised inside the backend and failed its whole batch.
    max_new_tokens: NewTokens = Field(default=32, gt=0)
    min_new_tokens: NewTokens = Field(default=0, ge=0)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    backend: BackendChoice | None = None
    add_special_tokens: bool = True
    stream: bool = False
    ignore_eos: bool = False
    top_k: TopK = 0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=1024)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Priority = 0

    _prompts_not_empty = field_validator("prompts")(classmethod(lambda cls, prompts: check_prompts(prompts)))

    def usage_bound(self) -> UsageBound:
        return UsageBound(prompt_token_bound(self.prompts), self.max_new_tokens * len(self.prompts))

    def set_extensions(self) -> dict[str, Any]:
        """The vLLM extensions this request sets away from their defaults, by name."""
        return {name: getattr(self, name) for name, default in VLLM_EXTENSION_DEFAULTS.items()
                if getattr(self, name) != default}

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


VLLM_EXTENSION_DEFAULTS: dict[str, Any] = {
    "ignore_eos": False, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "stop_token_ids": [],
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
    "priority": 0,
}
"""The extra sampling fields of vLLM's OpenAI server that a :class:`GenerationRequest` carries, and
their off values (vLLM's own defaults; top_k -1 is off too)."""
