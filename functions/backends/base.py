"""The protocol every backend implements, and the data it works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tpm_fed.protocol.errors import ContextLengthExceeded
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion


@dataclass(frozen=True)
class EncodedRequest:
    """A request whose prompts are already token ids (tokenized once, here)."""

    request: GenerationRequest
    prompt_ids: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


class Backend(Protocol):
    """A loaded model that answers batches of requests.

    Attributes:
        name: ``"torch"`` or ``"vllm"``, reported in results.
        context_length: Most tokens (prompt plus generated) one sequence may hold.
    """

    name: str
    context_length: int

    def encode(self, request: GenerationRequest) -> EncodedRequest:
        """Tokenize a request's prompts.

        Raises:
            ContextLengthExceeded: A prompt plus max_new_tokens does not fit.
        """
        ...

    def generate(self, batch: list[EncodedRequest]) -> list[list[Completion]]:
        """Answer every request of the batch: one completion per prompt, in order."""
        ...

    def close(self) -> None:
        """Release the model (the replica is being evicted)."""
        ...


def encode_request(tokenizer: Any, request: GenerationRequest, context_length: int) -> EncodedRequest:
    """Tokenize each prompt once; refuse one that leaves no room for ``max_new_tokens``.

    Raises:
        ContextLengthExceeded: A prompt plus max_new_tokens exceeds the context.
    """
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in request.prompts]
    for index, ids in enumerate(prompt_ids):
        if len(ids) + request.max_new_tokens > context_length:
            raise ContextLengthExceeded(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={request.max_new_tokens} "
                f"that exceeds the model's context of {context_length} tokens"
            )
    return EncodedRequest(request=request, prompt_ids=prompt_ids)


def token_id_set(value: int | list[int] | None) -> set[int]:
    """A config's ``eos_token_id`` (one id, a list, or none) as a set."""
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}
