"""The ``encode`` kind: texts in, one vector per text out, from an encoder model (retrieval embeddings).

An encoder model (sentence-transformers layout: a BERT/MiniLM transformer, its
own pooling and normalization, :mod:`tpm_fed.protocol.encoder_config`) is
served by replicas like any model and charged per input token. A text longer
than the encoder's context is refused whole, naming the limit, never cut.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tpm_fed.protocol.requests import (
    ServingRequest,
    UsageBound,
    check_prompts,
    prompt_token_bound,
)
from tpm_fed.protocol.results import _TensorResult

MAX_TEXTS = 2048
"""Texts in one request, as OpenAI's ``/v1/embeddings`` bounds its input array."""

VECTORS = "vectors"
"""The name of the one tensor an :class:`EncodeResult` carries: ``[texts, dimensions]`` float32."""


class EncodeRequest(ServingRequest):
    """Texts to vectors on an encoder model.

    Example (in-process, as a store ingests; over HTTP ``Client().submit(...)`` is the same)::

        >>> request = EncodeRequest.create("all-minilm-l6-v2", texts=["a cell divides", "rivers carry silt"])
        >>> result = runtime.submit(request).result()
        >>> result.vectors.shape, result.version, result.token_counts   # (2, 384), '1b2f...', [5, 5]

    Attributes:
        texts: One or more non-empty texts (at most :data:`MAX_TEXTS`), each within the
            encoder's context (special tokens included).
    """

    kind: Literal["encode"] = "encode"
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)

    _texts_not_empty = field_validator("texts")(classmethod(lambda cls, texts: check_prompts(texts)))

    @property
    def item_count(self) -> int:
        return len(self.texts)

    def usage_bound(self, max_tokens: int = 0, dimensions: int = 0) -> UsageBound:
        """At most one token per byte (plus specials) and no more than the context per text;
        the result's bytes: one float32 row per text."""
        tokens = sum(min(prompt_token_bound([text]), max_tokens) if max_tokens else prompt_token_bound([text])
                     for text in self.texts)
        return UsageBound(tokens, 0, len(self.texts) * dimensions * 4 + 1024)


class EncodeResult(_TensorResult):
    """The answer to an :class:`EncodeRequest`: one vector per text, in order.

    Attributes:
        token_counts: Tokens of each text (special tokens included): what was charged, per text.
        dimensions: Length of each vector.
        normalized: Each vector has unit L2 norm (the model's own ``Normalize`` module).
        pooling: How token states became one vector, as the model folder says.
    """

    token_counts: list[int]
    dimensions: int
    normalized: bool
    pooling: str

    @property
    def vectors(self) -> Any:
        """``[texts, dimensions]`` float32 numpy array."""
        return self.tensors[VECTORS]
