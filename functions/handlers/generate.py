"""``generate`` (mode 1): prompts in, text out, the whole batch in one backend call."""

from __future__ import annotations

from typing import Any

from functions.backends.base import Generates
from functions.outcomes import refused
from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Usage


def handle(backend: Generates, requests: list[GenerationRequest], policy: WorkerPolicy,
           channel: Any = None) -> list[dict[str, Any]]:
    """Tokenize each request (refusing one alone if it does not fit), then generate for all at once.

    With a back channel (:class:`functions.streaming.BackChannel`), requests that
    ask to stream send their text as it is made, if the backend can.
    """
    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    encoded = []
    for index, request in enumerate(requests):
        try:
            encoded.append((index, backend.encode(request)))
        except TpmError as error:
            outcomes[index] = refused(error)
    if encoded:
        batch = [item for _, item in encoded]
        streams = channel is not None and any(item.request.stream for item in batch)
        answers = backend.generate(batch, channel) if streams else backend.generate(batch)
        for (index, item), completions in zip(encoded, answers, strict=True):
            usage = Usage(prompt_tokens=item.prompt_tokens,
                          completion_tokens=sum(len(c.token_ids) for c in completions))
            outcomes[index] = {"result": {"completions": [c.to_wire() for c in completions],
                                          "usage": usage.to_wire()}}
    return outcomes  # type: ignore[return-value]
