"""Calls for code in the service's own process (tests, benchmarks): each builds a request and submits it.

The same as :class:`tpm_fed.client.Client`'s methods, without HTTP; everything goes through
:meth:`Engine.submit <tpm_fed.engine.engine.Engine.submit>`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import EmbeddingRequest, GenerationRequest, ModelRef, TraceRequest
from tpm_fed.protocol.results import EmbeddingResult, GenerationResult, ServedResult, SessionResult, TraceResult
from tpm_fed.protocol.sessions import SessionRequest
from tpm_fed.protocol.tensors import TensorData


class InProcessCalls:
    """generate, trace, embed and session, over the engine's ``submit`` and ``default_model`` (mixed into
    :class:`tpm_fed.service.runtime.Runtime` before :class:`~tpm_fed.engine.engine.Engine`)."""

    submit: Callable[..., Future[ServedResult]]
    default_model: Callable[[], ModelRef]

    def generate(self, prompts: str | list[str], model: str | None = None, *, identity: str | None = None,
                 **params: Any) -> Future[GenerationResult]:
        """Generate text (see :class:`~tpm_fed.protocol.requests.GenerationRequest` for ``params``)."""
        return self.submit(GenerationRequest.create(prompts, model or self.default_model(), **params), identity)

    def trace(self, prompts: str | list[str], model: str | None = None, *, identity: str | None = None,
              **params: Any) -> Future[TraceResult]:
        """Run prompts while reading and writing activations (see :class:`TraceRequest`)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.submit(TraceRequest.create(model or self.default_model(), prompts=prompts, **params), identity)

    def embed(self, inputs: list[Any], model: str | None = None, *, identity: str | None = None,
              **params: Any) -> Future[EmbeddingResult]:
        """Run data through adapters and the shared core (see :class:`EmbeddingRequest`)."""
        try:
            tensors = [value if isinstance(value, TensorData) else TensorData.of(value) for value in inputs]
        except ValueError as error:
            raise InvalidRequest(f"inputs: {error}") from None
        return self.submit(EmbeddingRequest.create(model or self.default_model(), inputs=tensors, **params), identity)

    def session(self, steps: list[Any], model: str | None = None, *, identity: str | None = None,
                **params: Any) -> Future[SessionResult]:
        """Run traces in order on one replica, later ones using what earlier ones saved (see :class:`SessionRequest`)."""
        return self.submit(SessionRequest.create(model or self.default_model(), steps=steps, **params), identity)
