"""What a batch line means to the service: its route's body, the request it asks for, and the answer.

A line goes through the very classes its route uses alone
(:class:`~tpm_fed.service.serving_completions.ServingCompletions` and its
siblings): the same body model validates it, the same code builds its
request, the same ``Runtime.submit`` places and charges it, and the answer is
the body that route would return. So a line's result equals the same request
sent alone, and a body the route would refuse is refused here, by line.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from tpm_fed.engine.interface import EngineClient
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.service.api_models import ChatCompletionBody, CompletionBody, EmbeddingBody

NATIVE_URL = "/tpm/v1/requests"
"""tpm-fed's own route: any request kind in its wire form (traces included); the answer is the result's wire form."""

BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionBody,
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/embeddings": EmbeddingBody,
}

LineBody = BaseModel | ServingRequest
"""A validated line body: its route's body model, or a request for the native route."""


def parse_body(url: str, body: dict[str, Any]) -> LineBody:
    """``body`` validated by the model its route ``url`` uses alone.

    Raises:
        InvalidRequest: The body would be refused by that route (every problem named), or it asks to stream.
    """
    if url == NATIVE_URL:
        from tpm_fed.protocol.kinds import request_from_wire

        return request_from_wire(body)
    try:
        parsed = BODIES[url].model_validate(body)
    except ValidationError as error:
        from tpm_fed.service.errors import describe_errors

        raise InvalidRequest(describe_errors(error.errors())) from None
    if getattr(parsed, "stream", False):
        raise InvalidRequest("stream: a batch line cannot stream (its answer is stored whole)")
    return parsed


def charging(body: LineBody, project: str | None) -> LineBody:
    """``body`` charging the batch's ``project``, unless the line names its own."""
    if project is None or getattr(body, "project", None) is not None:
        return body
    return body.model_copy(update={"project": project})


def request_for(runtime: EngineClient, url: str, body: LineBody) -> ServingRequest:
    """The request a line asks for, built as its route builds it (what a quote prices).

    Raises:
        InvalidRequest, UnknownModel...: What the route would raise building it (e.g. a chat line for a model
            without a chat template).
    """
    if url == NATIVE_URL:
        # A fresh id for every run: a line's id in the file must not decide which charge row it gets.
        return body.model_copy(update={"request_id": uuid.uuid4().hex})
    return _serving(url, runtime).request_for(body)


async def answer(runtime: EngineClient, url: str, body: LineBody, identity: str, observer: Any = None,
                 request: ServingRequest | None = None) -> dict[str, Any]:
    """Serve one line as its route would serve the same body alone (as ``request``, when built already with
    :func:`request_for`), and return that route's answer."""
    if url == NATIVE_URL:
        from tpm_fed.service.serving import serve

        served = await serve(runtime, request or request_for(runtime, url, body), identity, observer)
        return served.to_wire()
    return await _serving(url, runtime, observer).create(body, identity, request)


def _serving(url: str, runtime: EngineClient, observer: Any = None) -> Any:
    from tpm_fed.service.serving_chat import ServingChat
    from tpm_fed.service.serving_completions import ServingCompletions
    from tpm_fed.service.serving_embeddings import ServingEmbeddings

    if url == "/v1/completions":
        return ServingCompletions(runtime, observer)
    if url == "/v1/chat/completions":
        return ServingChat(runtime, observer)
    if url == "/v1/embeddings":
        return ServingEmbeddings(runtime, observer)
    raise InvalidRequest(f"url: unknown batch route {url!r}")
