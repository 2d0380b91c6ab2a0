"""What every route shares: submit a request for an identity, wait without blocking the loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


class Runtime(Protocol):
    """The federation runtime the service owns (see :class:`tpm_fed.service.runtime.Runtime`)."""

    def submit(self, request: ServingRequest, identity: str) -> Any: ...


class Observer(Protocol):
    """Told of every request that ends (see :class:`tpm_fed.service.metrics.ServiceMetrics`)."""

    def observe(self, kind: str, model: str, seconds: float, result: Any = None,
                error: BaseException | None = None) -> None: ...


async def serve(runtime: Runtime, request: ServingRequest, identity: str,
                observer: Observer | None = None) -> ServedResult:
    """Admit ``request`` (edge checks and the reservation run in a worker thread) and await its result.

    A caller that disconnects does not cancel the batch its request rode in:
    the request finishes and is charged once, for what ran.
    """
    started = time.perf_counter()
    try:
        future = await run_in_threadpool(runtime.submit, request, identity)
        result = await asyncio.wrap_future(future)
    except Exception as error:
        if observer is not None:
            observer.observe(request.kind, request.model.name, time.perf_counter() - started, error=error)
        raise
    if observer is not None:
        observer.observe(request.kind, request.model.name, time.perf_counter() - started, result=result)
    return result
