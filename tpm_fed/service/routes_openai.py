"""The OpenAI-compatible routes: models, completions, chat completions, embeddings (each served by the
serving object the composition root built once, :class:`tpm_fed.service.assembly.RouteServing`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tpm_fed.service.api_models import ChatCompletionBody, CompletionBody, EmbeddingBody
from tpm_fed.service.assembly import RouteServing, serving_of
from tpm_fed.service.auth import identity_of

router = APIRouter(prefix="/v1")


@router.get("/models")
def list_models(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    """Every model, with its versions, kinds and, per site, whether a replica is hot."""
    return {"object": "list", "data": request.app.state.runtime.model_cards()}


@router.post("/completions")
async def completions(body: CompletionBody, serving: RouteServing = Depends(serving_of),
                      identity: str = Depends(identity_of)) -> Any:
    return await serving.completions.create(body, identity)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, serving: RouteServing = Depends(serving_of),
                           identity: str = Depends(identity_of)) -> Any:
    return await serving.chat.create(body, identity)


@router.post("/embeddings")
async def embeddings(body: EmbeddingBody, serving: RouteServing = Depends(serving_of),
                     identity: str = Depends(identity_of)) -> Any:
    return await serving.embeddings.create(body, identity)
