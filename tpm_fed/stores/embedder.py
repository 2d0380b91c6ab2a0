"""Texts to unit vectors through the federation: the store's embedding model, served by replicas like any
model, placed by the broker and charged per token to the project by the ledger.

Every call goes through the runtime's public ``submit`` (the same path as ``/v1/embeddings``), so a store
never embeds anything the ledger does not see. Vectors come back L2-normalised here (an encoder that
normalises already is unchanged by it), so an inner product is a cosine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpm_fed.protocol.encoding import TEXT_EMBEDDING_KINDS, text_embedding_request, text_vectors
from tpm_fed.protocol.errors import ModelLoadError, UnknownModel
from tpm_fed.protocol.requests import ModelRef, ServingRequest
from tpm_fed.stores.chunking import TokenCounter
from tpm_fed.stores.engine import StoreEngine

TEXTS_PER_REQUEST = 32
"""Texts per embedding request at ingestion: requests of a file go out together and are batched by the
dispatcher, and a failure names a small group."""


@dataclass(frozen=True)
class Embedded:
    """Vectors for texts (rows in order, float32, unit length), the exact model version, what it cost."""

    vectors: np.ndarray
    model: str
    version: str
    request_ids: tuple[str, ...]
    prompt_tokens: int
    site: str


class Embedder:
    """One embedding model of the federation.

    Args:
        runtime: The federation runtime (its ``submit``, ``catalog`` and ``federation``).
        model: ``NAME`` or ``NAME@VERSION``.
    """

    def __init__(self, runtime: StoreEngine, model: str) -> None:
        self.runtime = runtime
        self.model = model
        self._counter: TokenCounter | None = None

    def version(self) -> str:
        """The version a request for this model is pinned to now."""
        return self.runtime.catalog.resolve_name(self.model).spec.version

    def counter(self) -> TokenCounter:
        """The model's tokenizer and context, read from its folder (light: the ``tokenizers`` library)."""
        if self._counter is None:
            from tokenizers import Tokenizer

            catalog = self.runtime.catalog
            spec = catalog.resolve_name(self.model).spec
            data = catalog.model_file(spec, "tokenizer.json")
            if data is None:
                raise ModelLoadError(f"model {self.model!r} has no tokenizer.json: a store cannot count its tokens")
            self._counter = TokenCounter(Tokenizer.from_str(data.decode()), _context_tokens(catalog, spec))
        return self._counter

    def embed(self, texts: list[str], identity: str, project: str, *, background: bool = False,
              charged: Callable[[list[str]], None] = lambda ids: None) -> Embedded:
        """Embed ``texts``: all or nothing. ``charged(request_ids)`` is told of every request that ran (and so
        was charged by the ledger) before this returns or raises, so a store records even a failed file's
        charges as its own.

        Raises:
            TpmError: Whatever the runtime refuses (placement, balance, context) or the worker raises.
        """
        futures: list[Future] = []
        try:
            with self.runtime.burst():
                for start in range(0, len(texts), TEXTS_PER_REQUEST):
                    request = embedding_request(self.runtime, self.model, texts[start:start + TEXTS_PER_REQUEST],
                                                project)
                    futures.append(self.runtime.submit(request, identity, background=background))
        finally:
            outcomes = [(future.result() if future.exception() is None else future.exception()) for future in futures]
            charged([outcome.request_id for outcome in outcomes if not isinstance(outcome, BaseException)])
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]
        results = outcomes
        rows = [np.asarray(vector, dtype=np.float32).reshape(-1) for result in results for vector in _rows(result)]
        vectors = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)
        versions = {result.version for result in results}
        if len(versions) > 1:  # the model changed mid-file: the chunks would not be comparable
            raise ModelLoadError(f"model {self.model!r} changed version while embedding ({', '.join(versions)})")
        return Embedded(vectors.astype(np.float32), results[0].model, results[0].version,
                        tuple(result.request_id for result in results),
                        sum(result.usage.prompt_tokens for result in results), results[0].site)


def embedding_request(runtime: StoreEngine, model: str, texts: list[str], project: str) -> ServingRequest:
    """The request that embeds ``texts``: an encoder's own vectors (the ``encode`` kind) when the model is an
    encoder, else the mean of a language model's final hidden states (``embed``, as ``/v1/embeddings`` asks)."""
    kinds = runtime.federation.model(ModelRef.parse(model).name).kinds
    return text_embedding_request(model, kinds, texts, project=project)


def default_model(runtime: StoreEngine) -> str:
    """The federation's first encoder; else its first model that serves ``embed``.

    Raises:
        UnknownModel: Neither.
    """
    models = runtime.federation.models
    for kind in TEXT_EMBEDDING_KINDS:
        chosen = next((m for m in models if kind in m.kinds), None)
        if chosen is not None:
            return chosen.name
    raise UnknownModel("this federation serves no embedding model (a model with the encode or embed kind); "
                       "name one with embedding_model")


def _rows(result: Any) -> list[Any]:
    return text_vectors(result)[0]


def _context_tokens(catalog: Any, spec: Any) -> int:
    """The encoder's context: sentence-transformers' ``max_seq_length`` when the folder has one, else the
    model's positions."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        data = catalog.model_file(spec, name)
        if data is not None and isinstance(json.loads(data).get(key), int):
            return int(json.loads(data)[key])
    raise ModelLoadError(f"model {spec.name!r}: no max_seq_length or max_position_embeddings in its folder")
