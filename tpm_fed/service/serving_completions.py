"""``POST /v1/completions``: prompts in, OpenAI's completion out (or its event stream)."""

from __future__ import annotations

import time
from typing import Any

from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import GenerationResult
from tpm_fed.service.api_models import FINISH_REASONS, CompletionBody, tpm_object
from tpm_fed.service.serving import Observer, Runtime, serve
from tpm_fed.service.streaming import EventStream


class ServingCompletions:
    def __init__(self, runtime: Runtime, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.observer = observer

    async def create(self, body: CompletionBody, identity: str) -> dict[str, Any] | EventStream:
        request = GenerationRequest.create(body.prompts(), body.model, **body.generation_fields(body.max_tokens))
        result: GenerationResult = await serve(self.runtime, request, identity, self.observer)
        created = int(time.time())
        head = {"id": f"cmpl-{request.request_id}", "object": "text_completion", "created": created,
                "model": body.model}
        usage = usage_of(result)
        if body.stream:
            # The replica answers whole batches, so the stream carries each choice in one chunk.
            chunks = [{**head, "choices": [{"index": i, "text": c.text, "logprobs": None,
                                            "finish_reason": FINISH_REASONS[c.finish_reason]}]}
                      for i, c in enumerate(result.completions)]
            return EventStream(chunks, usage_chunk={**head, "choices": [], "usage": usage,
                                                    "tpm": tpm_object(result, explain=body.explain)}
                               if body.stream_options and body.stream_options.include_usage else None)
        return {
            **head,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}
                        for i, c in enumerate(result.completions)],
            "usage": usage,
            "tpm": tpm_object(result, explain=body.explain),
        }


def usage_of(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.total_tokens}
