"""The HTTP API's request and response models, in one module (as vLLM's ``protocol``).

The OpenAI-compatible bodies accept what OpenAI's clients send, plus
tpm-fed's own parameters as extra body fields (``project``, ``location``,
``site``, ``backend``, ``seed``, ``explain``), as vLLM does with its own.
Anything else is refused by name: a typo must not be silently ignored. A
parameter we cannot honour (``n > 1``, ``logprobs``, ``echo``...) is
refused clearly rather than answered wrongly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tpm_fed.protocol.model import BackendChoice
from tpm_fed.protocol.requests import (
    VLLM_EXTENSION_DEFAULTS, CallerPriority, GenerationRequest, MinP, NewTokens, RepetitionPenalty, Seed, Temperature,
    TokenId, TopK, TopP,
)
from tpm_fed.stores.protocol import ChatFileSearch


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = False  # null: vLLM's server takes it as false
    # vLLM's extension (its own Anthropic front end sends it): usage in every chunk. The service knows a
    # request's token counts only at its end, so it is refused when asked for, by name.
    continuous_usage_stats: bool | None = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _usage_at_the_end(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("usage in every chunk is not supported: include_usage puts it in the last chunk")
        return value


class TpmParameters(_Body):
    """tpm-fed's own parameters, sent as extra body fields (``extra_body`` in the ``openai`` client)."""

    project: str | None = None
    location: str | None = None
    site: str | None = None
    backend: BackendChoice | None = None
    explain: bool = False


class _Sampling(TpmParameters):
    """What completions and chat share: sampling, stopping, streaming."""

    model: str = Field(min_length=1)
    # Sampling bounds are the contract's own (tpm_fed.protocol.requests), refused here by OpenAI's field names.
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    user: str | None = None  # accepted and ignored: the identity comes from the token
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: NewTokens = Field(default=0, ge=0)  # vLLM's extension: no end before this many tokens
    # vLLM's other sampling extensions, as its OpenAI server takes them (null: its default). Their
    # bounds are the contract's; whether a backend takes them is the backend's (docs/sampling.md).
    ignore_eos: bool = False
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=1024)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: CallerPriority = 0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (send n requests for n samples, with different seeds)")
        return n

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported yet")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("presence and frequency penalties are not supported")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def generation_fields(self, max_new_tokens: int) -> dict[str, Any]:
        """The fields of a :class:`GenerationRequest` these parameters set."""
        extensions = {name: default if getattr(self, name) is None else getattr(self, name)
                      for name, default in VLLM_EXTENSION_DEFAULTS.items()}
        return {
            "max_new_tokens": max_new_tokens, "min_new_tokens": self.min_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
            "seed": self.seed, "stop": self.stops(), "backend": self.backend, "project": self.project,
            "location": self.location, "site": self.site, **extensions,
        }


class CompletionBody(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: NewTokens = Field(default=16, gt=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
            raise ValueError("prompts must be text; token-id prompts are not supported")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        return best_of

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        """OpenAI clients may send content as a list of text parts; images are refused."""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError("only text content parts are supported")
                texts.append(str(part.get("text", "")))
            return "".join(texts)
        return content


class ChatCompletionBody(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NewTokens | None = Field(default=None, gt=0)
    max_completion_tokens: NewTokens | None = Field(default=None, gt=0)
    file_search: ChatFileSearch | None = None
    """tpm-fed's: answer with the best hits of these vector stores (:mod:`tpm_fed.service.chat_knowledge`)."""

    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class EmbeddingBody(TpmParameters):
    """``POST /v1/embeddings``: an encoder model's vectors, or pooled final hidden states of a language model."""

    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_inputs(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("inputs must be text; token-id inputs are not supported")
        if value == [] or value == "":
            raise ValueError("input must not be empty")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions (truncated embeddings) are not supported")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def tpm_object(result: Any, *, explain: bool) -> dict[str, Any]:
    """The ``tpm`` object every response carries: exact version, where it ran, and the charge."""
    charge = result.charge
    return {
        "request_id": result.request_id,
        "version": result.version,
        "backend": result.backend,
        "site": result.site,
        "replica": result.replica.replica_id,
        "warm": result.replica.warm,
        "load_s": result.timings.load_s,
        "charge": charge.to_wire() if charge is not None else None,
        "notes": result.notes,
        **({"placement": result.placement} if explain else {}),
    }


FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop"}
"""Our finish reasons in OpenAI's words (an end-of-sequence token and a stop string are both ``stop``)."""


__all__ = [
    "ChatCompletionBody", "ChatMessage", "CompletionBody", "EmbeddingBody", "FINISH_REASONS",
    "GenerationRequest", "StreamOptions", "TpmParameters", "tpm_object",
]
