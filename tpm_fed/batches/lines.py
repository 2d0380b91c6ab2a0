"""What a batch line means to the service: its route's body, the request it asks for, and the answer.

A line goes through the very objects its route uses alone (the service's
serving classes, :class:`~tpm_fed.service.serving_completions.ServingCompletions`
and its siblings), handed to the batch package by the composition root as
:class:`LineRoutes`: the same body model validates it, the same code builds
its request, the engine's same ``submit`` places and charges it, and the
answer is the body that route would render. So a line's result equals the
same request sent alone, and a body the route would refuse is refused here,
by line. The batch package sits above the serving classes (as vLLM's batch
runner sits above its ``OpenAIServing*`` classes) and imports none of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.http_errors import describe_errors
from tpm_fed.protocol.kinds import request_from_wire
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult

NATIVE_URL = "/tpm/v1/requests"
"""tpm-fed's own route: any request kind in its wire form (traces included); the answer is the result's wire form."""

LineBody = BaseModel | ServingRequest
"""A validated line body: its route's body model, or a request for the native route."""


class LineRoute(Protocol):
    """An OpenAI route a line may name, as the service serves it alone (split as vLLM splits its serving
    classes): the body model, building the request, and rendering a result into the route's answer."""

    body_model: type[BaseModel]

    def request_for(self, body: Any) -> ServingRequest: ...

    def render(self, body: Any, request: ServingRequest, result: ServedResult) -> dict[str, Any]: ...


class LineRoutes:
    """The routes batch lines may name: the OpenAI ones the composition root hands in, and the native one.

    Args:
        routes: URL -> that route's serving object (built once, at start).
    """

    def __init__(self, routes: Mapping[str, LineRoute]) -> None:
        self._routes = dict(routes)

    def _route(self, url: str) -> LineRoute:
        if url not in self._routes:
            raise InvalidRequest(f"url: unknown batch route {url!r}")
        return self._routes[url]

    def parse_body(self, url: str, body: dict[str, Any]) -> LineBody:
        """``body`` validated by the model its route ``url`` uses alone.

        Raises:
            InvalidRequest: The body would be refused by that route (every problem named), or it asks to stream.
        """
        if url == NATIVE_URL:
            return request_from_wire(body)
        try:
            parsed = self._route(url).body_model.model_validate(body)
        except ValidationError as error:
            raise InvalidRequest(describe_errors(error.errors())) from None
        if getattr(parsed, "stream", False):
            raise InvalidRequest("stream: a batch line cannot stream (its answer is stored whole)")
        return parsed

    def request_for(self, url: str, body: LineBody) -> ServingRequest:
        """The request a line asks for, built as its route builds it (what a quote prices, what runs).

        Raises:
            InvalidRequest, UnknownModel...: What the route would raise building it (e.g. a chat line for a model
                without a chat template).
        """
        if url == NATIVE_URL:
            # A fresh id for every run: a line's id in the file must not decide which charge row it gets.
            return body.model_copy(update={"request_id": uuid.uuid4().hex})
        return self._route(url).request_for(body)

    def render(self, url: str, body: LineBody, request: ServingRequest, result: ServedResult) -> dict[str, Any]:
        """The answer the route ``url`` gives for ``result``, as it would to the same body sent alone."""
        if url == NATIVE_URL:
            return result.to_wire()
        return self._route(url).render(body, request, result)


def charging(body: LineBody, project: str | None) -> LineBody:
    """``body`` charging the batch's ``project``, unless the line names its own."""
    if project is None or getattr(body, "project", None) is not None:
        return body
    return body.model_copy(update={"project": project})
