"""The back channel's routes (see stream_hub): workers hand in streamed text and early answers, and ask
for requests that may join their running batch.

No bearer token: the body's ``token`` is the secret the service made for the
running task that carries these requests, and it authenticates nothing else.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter()

MAX_ADMIT_WAIT_S = 5.0
"""The longest one ask for joining requests is held open."""


class StreamedChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    index: int = Field(ge=0)
    text: str


class Answer(BaseModel):
    """One request's outcome, sent when it finished (before its task did)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    outcome: dict[str, Any]


class StreamedChunks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    chunks: list[StreamedChunk]
    outcomes: list[Answer] = []
    served: dict[str, Any] = {}


class AdmitAsk(BaseModel):
    """A worker asks for requests that may join its running batch, or (``close``) says it takes no more."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)
    wait_s: float = Field(default=1.0, ge=0.0, le=MAX_ADMIT_WAIT_S)
    close: bool = False


@router.post("/tpm/v1/stream", include_in_schema=False)
def receive(body: StreamedChunks, request: Request) -> dict[str, Any]:
    outcomes = {answer.request_id: answer.outcome for answer in body.outcomes}
    delivered, cancelled = request.app.state.streams.deliver(
        body.token, [c.model_dump() for c in body.chunks], outcomes, body.served)
    return {"delivered": delivered, "cancelled": cancelled}


@router.post("/tpm/v1/stream/admit", include_in_schema=False)
async def admit(body: AdmitAsk, request: Request) -> dict[str, Any]:
    hub = request.app.state.streams
    if body.close:
        hub.stop_admitting(body.token)  # a flag and a wake-up: no thread needed
        return {"requests": [], "open": False}
    # A held ask waits on the event loop: it holds no thread of the pool submissions go through.
    joined, more = await hub.admit(body.token, body.wait_s)
    return {"requests": joined, "open": more}
