"""``POST /v1/responses``: OpenAI's Responses API, answering with knowledge from the service's vector stores
(the ``file_search`` tool); see :mod:`tpm_fed.service.serving_responses`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tpm_fed.service.auth import identity_of
from tpm_fed.service.serving_responses import ResponseBody, ServingResponses

router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponseBody, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    state = request.app.state
    serving = ServingResponses(state.runtime, state.stores, state.metrics)
    return await serving.create(body, identity, identity in state.operators)
