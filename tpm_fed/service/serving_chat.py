"""``POST /v1/chat/completions``: messages through the model's chat template, then generation."""

from __future__ import annotations

import time
from typing import Any

from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import GenerationResult
from tpm_fed.service.api_models import FINISH_REASONS, ChatCompletionBody, tpm_object
from tpm_fed.service.chat_template import ChatTemplate
from tpm_fed.service.serving import Observer, serve
from tpm_fed.service.serving_completions import usage_of
from tpm_fed.service.streaming import EventStream


class ServingChat:
    def __init__(self, runtime: Any, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.observer = observer

    async def create(self, body: ChatCompletionBody, identity: str) -> dict[str, Any] | EventStream:
        spec = self.runtime.catalog.resolve_name(body.model).spec
        template = ChatTemplate.of(spec.name, lambda name: self.runtime.catalog.model_file(spec, name))
        prompt = template.render([message.model_dump(exclude_none=True) for message in body.messages])
        request = GenerationRequest.create(prompt, body.model, add_special_tokens=False,
                                           **body.generation_fields(body.max_new_tokens()))
        result: GenerationResult = await serve(self.runtime, request, identity, self.observer)
        completion = result.completions[0]
        head = {"id": f"chatcmpl-{request.request_id}", "created": int(time.time()), "model": body.model}
        finish = FINISH_REASONS[completion.finish_reason]
        if body.stream:
            chunks = [
                {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": completion.text},
                              "logprobs": None, "finish_reason": None}]},
                {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]},
            ]
            usage_chunk = None
            if body.stream_options and body.stream_options.include_usage:
                usage_chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(result),
                               "tpm": tpm_object(result, explain=body.explain)}
            return EventStream(chunks, usage_chunk)
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage_of(result),
            "tpm": tpm_object(result, explain=body.explain),
        }
