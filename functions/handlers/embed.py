"""``embed`` (mode 2): every request's inputs through its adapters, one shared core batch."""

from __future__ import annotations

from typing import Any

from functions.backends.base import HiddenStates
from functions.policy import WorkerPolicy
from tpm_fed.protocol.requests import EmbeddingRequest


def handle(backend: HiddenStates, requests: list[EmbeddingRequest], policy: WorkerPolicy) -> list[dict[str, Any]]:
    """See :func:`functions.adapters.embed.run_embeddings`."""
    from functions.adapters.embed import run_embeddings

    return run_embeddings(backend, requests, policy=policy)
