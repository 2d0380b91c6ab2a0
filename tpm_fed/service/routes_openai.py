"""The OpenAI-compatible routes: models, completions, chat completions, embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tpm_fed.service.api_models import ChatCompletionBody, CompletionBody, EmbeddingBody
from tpm_fed.service.auth import identity_of
from tpm_fed.service.serving_chat import ServingChat
from tpm_fed.service.serving_completions import ServingCompletions
from tpm_fed.service.serving_embeddings import ServingEmbeddings

router = APIRouter(prefix="/v1")


@router.get("/models")
def list_models(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    """Every model, with its versions, kinds and, per site, whether a replica is hot."""
    return {"object": "list", "data": request.app.state.runtime.model_cards()}


@router.post("/completions")
async def completions(body: CompletionBody, request: Request, identity: str = Depends(identity_of)) -> Any:
    return await ServingCompletions(request.app.state.runtime, request.app.state.metrics,
                                    request.app.state.streams).create(body, identity)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, identity: str = Depends(identity_of)) -> Any:
    return await ServingChat(request.app.state.runtime, request.app.state.metrics,
                             request.app.state.streams).create(body, identity)


@router.post("/embeddings")
async def embeddings(body: EmbeddingBody, request: Request, identity: str = Depends(identity_of)) -> Any:
    return await ServingEmbeddings(request.app.state.runtime, request.app.state.metrics).create(body, identity)
