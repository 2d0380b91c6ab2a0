"""What every route shares: submit a request for an identity, wait without blocking the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from tpm_fed.catalog import ModelCatalog
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


class ServingEngine(Protocol):
    """What the serving classes need of the federation engine (:class:`tpm_fed.service.runtime.Runtime`):
    placing a request, and the catalog (a chat template is a file of the model's)."""

    catalog: ModelCatalog

    async def submit_async(self, request: ServingRequest, identity: str) -> Any: ...


class Observer(Protocol):
    """Told of every request that ends (see :class:`tpm_fed.service.metrics.ServiceMetrics`)."""

    def observe(self, kind: str, model: str, seconds: float, result: Any = None,
                error: BaseException | None = None) -> None: ...


async def start(runtime: ServingEngine, request: ServingRequest, identity: str,
                observer: Observer | None = None) -> asyncio.Task[ServedResult]:
    """Start ``request`` (edge checks and placement run on the event loop, :meth:`Engine.submit_async
    <tpm_fed.engine.engine.Engine.submit_async>`, and raise here, as HTTP errors) and return the task
    that resolves with its result.

    A caller that disconnects does not cancel the task its request rode in:
    the request finishes and is charged once, for what ran.
    """
    started = time.perf_counter()

    def observe(result: Any = None, error: BaseException | None = None) -> None:
        if observer is not None:
            observer.observe(request.kind, request.model.name, time.perf_counter() - started, result, error)

    try:
        future = await runtime.submit_async(request, identity)
    except Exception as error:
        observe(error=error)
        raise

    async def outcome() -> ServedResult:
        try:
            result = await asyncio.wrap_future(future)
        except Exception as error:
            observe(error=error)
            raise
        observe(result)
        return result

    return asyncio.ensure_future(outcome())  # runs to its end even if nobody awaits it


async def serve(runtime: ServingEngine, request: ServingRequest, identity: str,
                observer: Observer | None = None) -> ServedResult:
    """Start ``request`` and await its result (see :func:`start`)."""
    return await (await start(runtime, request, identity, observer))
