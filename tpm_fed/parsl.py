"""Parsl apps for workflows: ``generate``, ``trace``, ``embed``, ``session``, ``batch`` and ``search`` (a vector
store) return ``AppFuture``s.

They compose with other apps.

The apps run on a small thread-pool executor labelled ``tpm`` (add
:func:`tpm_executor` to your Parsl config); each call routes its request
through one shared :class:`~tpm_fed.client.Client` per process, so the
broker, service units and batching apply to workflows as to scripts, and
requests from many apps in flight at once are batched on the replica.

Example:
    >>> import parsl
    >>> from parsl.config import Config
    >>> from tpm_fed.parsl import generate, tpm_executor
    >>> with parsl.load(Config(executors=[tpm_executor()])):
    ...     answer = generate(GenerationRequest.create("The cell", "demo-llama"))
    ...     print(answer.result().texts)
"""

from __future__ import annotations

import threading
from typing import Any

from parsl import python_app
from parsl.executors import ThreadPoolExecutor

from tpm_fed.client import Client
from tpm_fed.protocol.requests import EmbeddingRequest
from tpm_fed.protocol.requests import TraceRequest
from tpm_fed.protocol.requests import GenerationRequest, ServingRequest
from tpm_fed.protocol.results import ServedResult
from tpm_fed.protocol.sessions import SessionRequest

EXECUTOR_LABEL = "tpm"

_client: Client | None = None
_client_lock = threading.Lock()


def tpm_executor(max_threads: int = 64) -> ThreadPoolExecutor:
    """The Parsl executor the apps run on (threads that wait on the federation)."""
    return ThreadPoolExecutor(label=EXECUTOR_LABEL, max_threads=max_threads)


def use_client(client: Client | None) -> None:
    """Set the client the apps use in this process (default: ``Client()`` on first use)."""
    global _client
    with _client_lock:
        _client = client


def _shared_client() -> Client:
    global _client
    with _client_lock:
        if _client is None:
            _client = Client()
        return _client


@python_app(executors=[EXECUTOR_LABEL])
def _serve_app(request: ServingRequest) -> ServedResult:
    from tpm_fed.parsl import _shared_client

    return _shared_client().submit(request).result()


def _app_for(kind: type[ServingRequest], name: str):
    def app(request, **app_options: Any):
        if not isinstance(request, kind):
            raise TypeError(f"tpm_fed.parsl.{name} takes a {kind.__name__} ({kind.__name__}.create(...)); "
                            f"got {type(request).__name__}")
        return _serve_app(request, **app_options)

    app.__name__ = app.__qualname__ = name
    app.__doc__ = f"""A Parsl app: answer a {kind.__name__}; returns an ``AppFuture`` of the result.

    Raises:
        TypeError: ``request`` is not a {kind.__name__} (refused before Parsl runs anything).
    """
    return app


generate = _app_for(GenerationRequest, "generate")
trace = _app_for(TraceRequest, "trace")
embed = _app_for(EmbeddingRequest, "embed")
session = _app_for(SessionRequest, "session")


@python_app(executors=[EXECUTOR_LABEL])
def _batch_app(source: Any, project: str | None, metadata: dict[str, str] | None) -> list[dict[str, Any]]:
    from tpm_fed.parsl import _shared_client

    client = _shared_client()
    created = client.batches.submit(source, project=project, metadata=metadata)
    client.batches.wait(created["id"])
    return client.batches.results(created["id"])


def batch(source: Any, *, project: str | None = None, metadata: dict[str, str] | None = None, **app_options: Any):
    """A Parsl app: run a batch file (a path, or its JSONL bytes) through the service's batch API.

    The ``AppFuture`` resolves, once the batch has ended, with one line per input line in
    input order (``custom_id``, ``response`` or ``error``), as ``tpm batch results`` prints them.
    A file the service refuses (a bad line, over balance) fails the future with the typed error.
    """
    return _batch_app(source, project, metadata, **app_options)


@python_app(executors=[EXECUTOR_LABEL])
def _search_app(store: str, query: str, max_results: int, filters: dict[str, Any] | None) -> dict[str, Any]:
    from tpm_fed.parsl import _shared_client

    return _shared_client().stores.search(store, query, max_results=max_results, filters=filters)


def search(store: str, query: str, *, max_results: int = 10, filters: dict[str, Any] | None = None,
           **app_options: Any):
    """A Parsl app: search a vector store (``NAME``, ``vs_...``, or pinned ``...@SNAPSHOT``) inside a workflow.

    The ``AppFuture`` resolves with OpenAI's search results page; its ``["tpm"]["ref"]`` names the snapshot
    searched, so a later step (or a rerun of the workflow) can pin the same knowledge.
    """
    return _search_app(store, query, max_results, filters, **app_options)
