"""``POST /v1/embeddings``: retrieval vectors from an encoder model, or pooled hidden states of a language model.

A model whose kinds list ``encode`` (an encoder: sentence-transformers layout)
answers with its own pooling and normalization, read from its folder, as
``SentenceTransformer.encode`` would: the vectors a vector store searches. A
language model answers as before: the mean of its final hidden states over
every token of the text (special tokens the tokenizer adds included), after
the model's final norm, not normalised. ``tpm.pooling`` says which a caller got.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from tpm_fed.protocol.encoding import EncodeResult, text_embedding_request, text_vectors
from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.requests import ModelRef, ServingRequest
from tpm_fed.protocol.results import EmbeddingResult
from tpm_fed.service.api_models import EmbeddingBody, tpm_object
from tpm_fed.service.serving import Observer, ServingEngine, serve


class ServingEmbeddings:
    body_model = EmbeddingBody

    def __init__(self, runtime: ServingEngine, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.observer = observer

    def request_for(self, body: EmbeddingBody) -> ServingRequest:
        """The request ``body`` asks for (a batch quotes and runs lines through this too): an encoder's
        vectors, or a language model's pooled final hidden states (:func:`text_embedding_request`)."""
        try:
            kinds = self.runtime.federation.model(ModelRef.parse(body.model).name).kinds
        except TpmError:  # an unknown model: the request says so when it is submitted
            kinds = []
        return text_embedding_request(body.model, kinds, body.inputs(), project=body.project,
                                      location=body.location, site=body.site)

    async def create(self, body: EmbeddingBody, identity: str, request: ServingRequest | None = None) -> dict[str, Any]:
        """Serve ``body`` (as ``request`` when the caller built it already with :meth:`request_for`)."""
        request = request or self.request_for(body)
        return self.render(body, request, await serve(self.runtime, request, identity, self.observer))

    def render(self, body: EmbeddingBody, request: ServingRequest, result: EmbeddingResult | EncodeResult
               ) -> dict[str, Any]:
        """The route's answer for ``result`` (a batch line's too): an encoder's vectors, or a language
        model's pooled final hidden states."""
        rows, pooling = text_vectors(result)
        data = []
        for index, vector in enumerate(rows):
            row = vector.reshape(-1).astype("<f4")
            encoded = base64.b64encode(row.tobytes()).decode() if body.encoding_format == "base64" else row.tolist()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return {
            "object": "list",
            "data": data,
            "model": body.model,
            "created": int(time.time()),
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
            "tpm": {**tpm_object(result, explain=body.explain), "pooling": pooling},
        }
