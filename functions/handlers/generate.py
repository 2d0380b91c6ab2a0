"""``generate`` (mode 1): prompts in, text out, the whole batch in one backend call."""

from __future__ import annotations

from typing import Any

from functions.backends.base import Generates
from functions.outcomes import generated, refused
from functions.policy import WorkerPolicy
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.requests import GenerationRequest


def handle(backend: Generates, requests: list[GenerationRequest], policy: WorkerPolicy,
           channel: Any = None) -> list[dict[str, Any]]:
    """Tokenize each request (refusing one alone if it does not fit), then generate for all at once.

    With a back channel (:class:`functions.back_channel.BackChannel`), requests that
    ask to stream send their text as it is made, and a backend that can (vLLM)
    answers each request as it finishes and takes in requests that join the
    running batch (:class:`functions.joining.JoinableTask`).
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
        if channel is None:
            answers = backend.generate(batch)
        else:
            from functions.joining import JoinableTask

            answers = backend.generate(batch, JoinableTask(channel, backend.encode))
        for (index, item), completions in zip(encoded, answers, strict=True):
            outcomes[index] = generated(item, completions)
    return outcomes  # type: ignore[return-value]
