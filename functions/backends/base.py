"""What every backend is, the capabilities a backend may have, and the data it works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tpm_fed.protocol.errors import BackendUnavailable
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion
from tpm_fed.protocol.validation import check_context


@dataclass(frozen=True)
class EncodedRequest:
    """A request whose prompts are already token ids (tokenized once, here)."""

    request: GenerationRequest
    prompt_ids: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


class Backend(Protocol):
    """A loaded model, held by a replica.

    What it can serve is told by which capability protocols below it satisfies
    (:data:`CAPABILITIES`, keyed like the ``capability`` column of
    :data:`tpm_fed.protocol.kinds.KINDS`); a backend is one file with the
    members of the capabilities it has, and nothing else declares them.

    Attributes:
        name: ``"torch"`` or ``"vllm"``, reported in results.
        context_length: Most tokens (prompt plus generated) one sequence may hold.
    """

    name: str
    context_length: int

    def close(self) -> None:
        """Release the model (the replica is being evicted)."""
        ...


@runtime_checkable
class Generates(Protocol):
    """Generates text: what ``generate`` requests need."""

    def encode(self, request: GenerationRequest) -> EncodedRequest:
        """Tokenize a request's prompts.

        Raises:
            ContextLengthExceeded: A prompt plus max_new_tokens does not fit.
        """
        ...

    def generate(self, batch: list[EncodedRequest], channel: Any = None) -> list[list[Completion]]:
        """Answer every request of the batch: one completion per prompt, in order.

        ``channel`` (:class:`functions.back_channel.BackChannel`): send the text of
        requests with ``stream`` set as it is made. A backend that cannot
        ignores it (the text then arrives with the result).
        """
        ...


@runtime_checkable
class Traces(Protocol):
    """Reads and writes activations inside the forward pass: what ``trace`` requests need."""

    @property
    def tracer(self) -> Any:
        """A :class:`functions.interventions.tracer.Tracer` on this model."""
        ...


@runtime_checkable
class HiddenStates(Protocol):
    """Exposes the core model itself, for embedding requests (``hidden_states``).

    ``model`` is a transformers causal LM: ``model.base_model(inputs_embeds=...,
    attention_mask=...)`` runs the core on the caller's embeddings, and its
    input embeddings turn ``tokenizer``'s ids into them for text items.
    """

    model: Any
    tokenizer: Any
    context_length: int


@runtime_checkable
class Encodes(Protocol):
    """Turns texts into one vector each, pooled and normalized as the model folder says: ``encode`` requests.

    ``config`` is the folder's :class:`~tpm_fed.protocol.encoder_config.EncoderConfig`.
    """

    config: Any
    context_length: int

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included (nothing is cut)."""
        ...

    def encode_ids(self, ids: list[list[int]]) -> Any:
        """``[len(ids), dimensions]`` float32 numpy array; every sequence must fit the context."""
        ...


CAPABILITIES: dict[str, type] = {"generate": Generates, "trace": Traces, "hidden_states": HiddenStates,
                                 "encode": Encodes}
"""Capability name (the ``capability`` column of the kinds table) -> the protocol that has it."""


def require_capability(backend: Backend, capability: str, kind: str) -> Any:
    """``backend``, if it has ``capability``.

    Raises:
        BackendUnavailable: It has not (e.g. a trace on a vLLM replica).
    """
    if not isinstance(backend, CAPABILITIES[capability]):
        raise BackendUnavailable(
            f"{kind} requests need a backend with the {capability!r} capability; this replica runs "
            f"{backend.name}, which has not (the torch backend serves every language-model kind; "
            "an encoder model serves encode alone)"
        )
    return backend


def encode_request(tokenizer: Any, request: GenerationRequest, context_length: int) -> EncodedRequest:
    """Tokenize each prompt once (special tokens as the request says); refuse one that leaves no room.

    Raises:
        ContextLengthExceeded: A prompt plus max_new_tokens exceeds the context.
    """
    prompt_ids = [tokenizer(prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
                  for prompt in request.prompts]
    check_context(request.max_new_tokens, context_length, [len(ids) for ids in prompt_ids])
    return EncodedRequest(request=request, prompt_ids=prompt_ids)


def token_id_set(value: int | list[int] | None) -> set[int]:
    """A config's ``eos_token_id`` (one id, a list, or none) as a set."""
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}
