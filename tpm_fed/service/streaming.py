"""Server-sent events in OpenAI's shape: ``data: {chunk}`` lines, then ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse


class EventStream(StreamingResponse):
    """A finished answer sent as OpenAI stream chunks (with the usage chunk when asked for)."""

    def __init__(self, chunks: list[dict[str, Any]], usage_chunk: dict[str, Any] | None = None) -> None:
        super().__init__(_events(chunks, usage_chunk), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(chunks: list[dict[str, Any]], usage_chunk: dict[str, Any] | None) -> AsyncIterator[bytes]:
    for chunk in chunks + ([usage_chunk] if usage_chunk is not None else []):
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"
