"""``POST /tpm/v1/stream``: workers hand in streamed text (the back channel; see stream_hub).

No bearer token: the body's ``token`` is the secret the service made for the
running task that carries these requests, and it authenticates nothing else.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter()


class StreamedChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    index: int = Field(ge=0)
    text: str


class StreamedChunks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    chunks: list[StreamedChunk]


@router.post("/tpm/v1/stream", include_in_schema=False)
def receive(body: StreamedChunks, request: Request) -> dict[str, Any]:
    delivered, cancelled = request.app.state.streams.deliver(body.token, [c.model_dump() for c in body.chunks])
    return {"delivered": delivered, "cancelled": cancelled}
