"""``encode``: texts to vectors on an encoder, every request's texts in one sorted, batched pass.

Each request's texts are tokenized whole; a request with a text over the
encoder's context is refused alone, naming the text, its length and the limit
(nothing is cut, so nothing is charged for a vector the caller did not ask
for). The rest share the backend's passes, and each gets its own rows back.
"""

from __future__ import annotations

from typing import Any

from functions.backends.base import Encodes
from functions.outcomes import refused
from functions.policy import WorkerPolicy
from tpm_fed.protocol.encoding import VECTORS, EncodeRequest
from tpm_fed.protocol.errors import ContextLengthExceeded, TpmError


def handle(backend: Encodes, requests: list[EncodeRequest], policy: WorkerPolicy) -> list[dict[str, Any]]:
    from safetensors.numpy import save

    from functions.references import deliver

    outcomes: list[dict[str, Any] | None] = [None] * len(requests)
    accepted: list[tuple[int, list[list[int]]]] = []
    for index, request in enumerate(requests):
        ids = backend.token_ids(request.texts)
        try:
            check_fits(ids, backend.context_length, request.model.name)
        except TpmError as error:
            outcomes[index] = refused(error)
        else:
            accepted.append((index, ids))
    if accepted:
        vectors = backend.encode_ids([row for _, ids in accepted for row in ids])
        cursor = 0
        for index, ids in accepted:
            rows = vectors[cursor:cursor + len(ids)]
            cursor += len(ids)
            try:
                delivered = deliver(save({VECTORS: rows}), policy)
            except TpmError as error:
                outcomes[index] = refused(error)
                continue
            counts = [len(row) for row in ids]
            outcomes[index] = {"result": {
                **delivered,
                "token_counts": counts,
                "dimensions": int(rows.shape[1]),
                "normalized": bool(backend.config.normalize),
                "pooling": backend.config.describe(),
                "usage": {"prompt_tokens": sum(counts), "completion_tokens": 0, "activation_bytes": 0},
            }}
    return outcomes  # type: ignore[return-value]


def check_fits(ids: list[list[int]], context_length: int, model: str) -> None:
    """Refuse a text whose tokens exceed the encoder's context (special tokens included).

    Raises:
        ContextLengthExceeded: Naming the first such text, its tokens and the limit.
    """
    for position, row in enumerate(ids):
        if context_length and len(row) > context_length:
            raise ContextLengthExceeded(
                f"text {position} has {len(row)} tokens; the encoder {model!r} takes at most {context_length} "
                "tokens per text (special tokens included); split it (texts are never truncated)")
