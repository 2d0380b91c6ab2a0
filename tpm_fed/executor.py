"""``tpm_fed.Executor``: a ``concurrent.futures.Executor`` for scripts.

In the spirit of ``globus_compute_sdk.Executor``, but what it runs is a
request, not an arbitrary function: ``submit`` takes a
:class:`~tpm_fed.request.GenerationRequest` and routes it through the broker
(placement, service units, batching) exactly as ``Client.submit`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

from tpm_fed.client import Client
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.protocol.results import ServedResult


class Executor(futures.Executor):
    """Submit requests to a federation from a script.

    Args:
        client: An open :class:`~tpm_fed.client.Client` to use (the executor
            then leaves it open on shutdown); by default one is made from
            ``client_options`` and closed on shutdown.

    Example:
        >>> with Executor() as executor:
        ...     future = executor.submit(GenerationRequest.create("The cell", "demo-llama"))
        ...     print(future.result().texts)
    """

    def __init__(self, client: Client | None = None, **client_options: Any) -> None:
        self._owns_client = client is None
        self.client = client or Client(**client_options)
        self._shut = False

    def submit(self, request: ServingRequest, /, *args: Any, **kwargs: Any) -> futures.Future[ServedResult]:
        """Route ``request`` through the broker; returns a future of its result.

        Raises:
            TypeError: ``request`` is not a request (this executor runs requests, not functions).
        """
        if self._shut:
            raise RuntimeError("cannot submit after shutdown")
        if args or kwargs or not isinstance(request, ServingRequest):
            raise TypeError(
                "tpm_fed.Executor.submit takes one request: GenerationRequest, TraceRequest or "
                f"EmbeddingRequest (build it with .create); got {type(request).__name__}"
            )
        return self.client.submit(request)

    def map(self, requests: Iterable[ServingRequest], *, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[ServedResult]:
        """Submit every request at once (they batch together), yield results in order."""
        submitted = [self.submit(request) for request in requests]
        return (future.result(timeout=timeout) for future in submitted)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut = True
        if self._owns_client:
            self.client.close()
