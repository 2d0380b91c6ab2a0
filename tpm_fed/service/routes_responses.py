"""``POST /v1/responses``: OpenAI's Responses API, answering with knowledge from the service's vector stores
(the ``file_search`` tool); see :mod:`tpm_fed.service.serving_responses`."""

from __future__ import annotations

from typing import Any

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from tpm_fed.service.auth import identity_of
from tpm_fed.service.assembly import RouteServing, serving_of
from tpm_fed.service.serving_responses import ResponseBody, stream_events

router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponseBody, request: Request, serving: RouteServing = Depends(serving_of),
                          identity: str = Depends(identity_of)) -> Any:
    response = await serving.responses.create(body, identity, identity in request.app.state.operators)
    if not body.stream:
        return response
    lines = "".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in stream_events(response))
    return StreamingResponse(iter([lines.encode()]), media_type="text/event-stream")
