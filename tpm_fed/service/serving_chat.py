"""``POST /v1/chat/completions``: messages through the model's chat template, then generation."""

from __future__ import annotations

import time
from typing import Any

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import GenerationResult
from tpm_fed.service.api_models import FINISH_REASONS, ChatCompletionBody, tpm_object
from tpm_fed.service.back_channel_hub import BackChannelHub
from tpm_fed.service.chat_template import ChatTemplate
from tpm_fed.service.serving import Observer, ServingEngine, serve
from tpm_fed.service.serving_completions import usage_of
from tpm_fed.service.streaming import LiveStream, remainder, stream_answer


class ServingChat:
    """Args: ``channels`` is the back channel's hub (it gives tasks the service's own URL, never a caller's);
    ``stores`` the vector stores ``file_search`` reads (None: a batch line's, which refuses it)."""

    body_model = ChatCompletionBody

    def __init__(self, runtime: ServingEngine, observer: Observer | None = None, channels: BackChannelHub | None = None,
                 stores: Any = None) -> None:
        self.runtime = runtime
        self.observer = observer
        self.channels = channels
        self.stores = stores

    def request_for(self, body: ChatCompletionBody) -> GenerationRequest:
        """The request ``body`` asks for: its messages through the model's template (batches use this too)."""
        if body.file_search is not None:  # searched by the route (create), never silently dropped
            raise InvalidRequest("file_search: answered by POST /v1/chat/completions itself, not in a batch")
        spec = self.runtime.catalog.resolve_name(body.model).spec
        template = ChatTemplate.of(spec.name, lambda name: self.runtime.catalog.model_file(spec, name))
        prompt = template.render([message.model_dump(exclude_none=True) for message in body.messages])
        return GenerationRequest.create(prompt, body.model, add_special_tokens=False, stream=bool(body.stream),
                                        **body.generation_fields(body.max_new_tokens()))

    async def create(self, body: ChatCompletionBody, identity: str,
                     request: GenerationRequest | None = None) -> dict[str, Any] | LiveStream:
        """Serve ``body`` (as ``request`` when the caller built it already with :meth:`request_for`)."""
        knowledge: dict[str, Any] = {}
        if body.file_search is not None:  # the stores' hits go in as a system message (tpm-fed's extension)
            from starlette.concurrency import run_in_threadpool

            from tpm_fed.service.chat_knowledge import with_knowledge

            body, knowledge = await run_in_threadpool(with_knowledge, self, body, identity)
            request = None
        request = request or self.request_for(body)
        if body.stream:
            return await self._stream(body, request, identity, _head(request, body))
        return self.render(body, request, await serve(self.runtime, request, identity, self.observer), knowledge)

    def render(self, body: ChatCompletionBody, request: GenerationRequest, result: GenerationResult,
               knowledge: dict[str, Any] | None = None) -> dict[str, Any]:
        """The route's answer for ``result`` (a batch line's too; ``knowledge``: the stores' hits it was given)."""
        completion = result.completions[0]
        return {
            **_head(request, body),
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": FINISH_REASONS[completion.finish_reason]}],
            "usage": usage_of(result),
            "tpm": {**tpm_object(result, explain=body.explain), **(knowledge or {})},
        }

    async def _stream(self, body: ChatCompletionBody, request: GenerationRequest, identity: str,
                      head: dict[str, Any]) -> LiveStream:
        head = {**head, "object": "chat.completion.chunk"}
        first = [True]

        def delta(_: int, text: str) -> dict[str, Any]:
            message = {"role": "assistant", "content": text} if first[0] else {"content": text}
            first[0] = False
            return {**head, "choices": [{"index": 0, "delta": message, "logprobs": None, "finish_reason": None}]}

        def ending(result: GenerationResult, sent: dict[int, str], streamed: bool) -> list[dict[str, Any]]:
            completion = result.completions[0]
            rest = remainder(completion.text, sent.get(0, ""))
            chunks = [delta(0, rest)] if rest or first[0] else []
            chunks.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": FINISH_REASONS[completion.finish_reason]}],
                           "tpm": {"streamed": streamed}})
            if body.stream_options and body.stream_options.include_usage:
                chunks.append({**head, "choices": [], "usage": usage_of(result),
                               "tpm": {**tpm_object(result, explain=body.explain), "streamed": streamed}})
            return chunks

        return await stream_answer(self, request, identity, delta, ending)


def _head(request: GenerationRequest, body: ChatCompletionBody) -> dict[str, Any]:
    return {"id": f"chatcmpl-{request.request_id}", "created": int(time.time()), "model": body.model}
