"""``POST /v1/completions``: prompts in, OpenAI's completion out (or its event stream)."""

from __future__ import annotations

import time
from typing import Any

from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import GenerationResult
from tpm_fed.service.api_models import FINISH_REASONS, CompletionBody, tpm_object
from tpm_fed.service.back_channel_hub import BackChannelHub
from tpm_fed.service.serving import Observer, ServingEngine, serve
from tpm_fed.service.streaming import LiveStream, remainder, stream_answer


class ServingCompletions:
    """Args: ``channels`` is the back channel's hub (it gives tasks the service's own URL, never a caller's)."""

    body_model = CompletionBody

    def __init__(self, runtime: ServingEngine, observer: Observer | None = None, channels: BackChannelHub | None = None) -> None:
        self.runtime = runtime
        self.observer = observer
        self.channels = channels

    def request_for(self, body: CompletionBody) -> GenerationRequest:
        """The request ``body`` asks for (a batch quotes and runs lines through this too)."""
        return GenerationRequest.create(body.prompts(), body.model, stream=bool(body.stream),
                                        **body.generation_fields(body.max_tokens))

    async def create(self, body: CompletionBody, identity: str,
                     request: GenerationRequest | None = None) -> dict[str, Any] | LiveStream:
        """Serve ``body`` (as ``request`` when the caller built it already with :meth:`request_for`)."""
        request = request or self.request_for(body)
        if body.stream:
            return await self._stream(body, request, identity, _head(body, request))
        return self.render(body, request, await serve(self.runtime, request, identity, self.observer))

    def render(self, body: CompletionBody, request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
        """The route's answer for ``result`` (a batch line's too)."""
        return {
            **_head(body, request),
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": FINISH_REASONS[c.finish_reason]}
                        for i, c in enumerate(result.completions)],
            "usage": usage_of(result),
            "tpm": tpm_object(result, explain=body.explain),
        }

    async def _stream(self, body: CompletionBody, request: GenerationRequest, identity: str,
                      head: dict[str, Any]) -> LiveStream:
        def delta(index: int, text: str) -> dict[str, Any]:
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]}

        def ending(result: GenerationResult, sent: dict[int, str], streamed: bool) -> list[dict[str, Any]]:
            last = len(result.completions) - 1
            chunks = [{**head, "choices": [{"index": i, "text": remainder(c.text, sent.get(i, "")), "logprobs": None,
                                            "finish_reason": FINISH_REASONS[c.finish_reason]}],
                       **({"tpm": {"streamed": streamed}} if i == last else {})}
                      for i, c in enumerate(result.completions)]
            if body.stream_options and body.stream_options.include_usage:
                chunks.append({**head, "choices": [], "usage": usage_of(result),
                               "tpm": {**tpm_object(result, explain=body.explain), "streamed": streamed}})
            return chunks

        return await stream_answer(self, request, identity, delta, ending)


def _head(body: CompletionBody, request: GenerationRequest) -> dict[str, Any]:
    return {"id": f"cmpl-{request.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}


def usage_of(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.total_tokens}
