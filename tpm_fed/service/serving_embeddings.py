"""``POST /v1/embeddings``: the mean of the core's final hidden states over each text's tokens.

Pooling is ``mean`` over every token of the text (special tokens the
tokenizer adds included), after the model's final norm: the representation
the language-model head reads. Rows are not normalised; callers who want
cosine similarity normalise them.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from tpm_fed.engine.interface import EngineClient
from tpm_fed.protocol.requests import EmbeddingRequest
from tpm_fed.protocol.results import EmbeddingResult
from tpm_fed.service.api_models import EmbeddingBody, tpm_object
from tpm_fed.service.serving import Observer, serve

POOLING = "mean"


class ServingEmbeddings:
    def __init__(self, runtime: EngineClient, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.observer = observer

    def request_for(self, body: EmbeddingBody) -> EmbeddingRequest:
        """The request ``body`` asks for (a batch quotes and runs lines through this too)."""
        return EmbeddingRequest.create(body.model, texts=body.inputs(), pool=POOLING, project=body.project,
                                       location=body.location, site=body.site)

    async def create(self, body: EmbeddingBody, identity: str, request: EmbeddingRequest | None = None) -> dict[str, Any]:
        """Serve ``body`` (as ``request`` when the caller built it already with :meth:`request_for`)."""
        request = request or self.request_for(body)
        result: EmbeddingResult = await serve(self.runtime, request, identity, self.observer)
        data = []
        for index, vector in enumerate(result.outputs):
            row = vector.reshape(-1).astype("<f4")
            encoded = base64.b64encode(row.tobytes()).decode() if body.encoding_format == "base64" else row.tolist()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return {
            "object": "list",
            "data": data,
            "model": body.model,
            "created": int(time.time()),
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
            "tpm": {**tpm_object(result, explain=body.explain), "pooling": f"{POOLING} of final hidden states"},
        }
