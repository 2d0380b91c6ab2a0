"""The back channel's routes (see back_channel_hub): workers hand in streamed text and early answers, and ask
for requests that may join their running batch.

No bearer token: the body's ``token`` is the secret the service made for the
running task that carries these requests, and it authenticates nothing else.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tpm_fed.protocol.back_channel import JoinAsk, ChannelPost, ChannelPostAnswer

router = APIRouter()


@router.post("/tpm/v1/stream", include_in_schema=False)
def receive(body: ChannelPost, request: Request) -> dict[str, Any]:
    outcomes = {answer.request_id: answer.outcome.to_wire() for answer in body.outcomes}
    served = body.served.model_dump(exclude_none=True) if body.served is not None else None
    delivered, cancelled = request.app.state.streams.deliver(
        body.token, [c.model_dump() for c in body.chunks], outcomes, served)
    return ChannelPostAnswer(delivered=delivered, cancelled=cancelled).to_wire()


@router.post("/tpm/v1/stream/admit", include_in_schema=False)
async def admit(body: JoinAsk, request: Request) -> dict[str, Any]:
    hub = request.app.state.streams
    if body.close:
        hub.stop_admitting(body.token)  # a flag and a wake-up: no thread needed
        return {"requests": [], "open": False}
    # A held ask waits on the event loop: it holds no thread of the pool submissions go through.
    joined, more = await hub.admit(body.token, body.wait_s)
    return {"requests": joined, "open": more}
