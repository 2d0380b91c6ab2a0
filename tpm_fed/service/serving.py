"""What every route shares: submit a request for an identity, wait without blocking the loop."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


class Runtime(Protocol):
    """The federation runtime the service owns (see :class:`tpm_fed.service.runtime.Runtime`)."""

    def submit(self, request: ServingRequest, identity: str) -> Any: ...


async def serve(runtime: Runtime, request: ServingRequest, identity: str) -> ServedResult:
    """Admit ``request`` (edge checks and the reservation run in a worker thread) and await its result.

    A caller that disconnects does not cancel the batch its request rode in:
    the request finishes and is charged once, for what ran.
    """
    future = await run_in_threadpool(runtime.submit, request, identity)
    return await asyncio.wrap_future(future)
