"""The composition root: the service's parts, built once in order and taken down in reverse.

``tpm serve``, the tests' service fixtures and the benchmarks build one
:class:`ServiceAssembly`; :func:`tpm_fed.service.app.build_app` serves what it
built, and nothing is set on the engine from the HTTP layer. In order:

1. the back channel's hub (plain data, no thread: made first only because the
   engine is handed it at construction, typed by
   :class:`~tpm_fed.engine.interface.TaskChannels`);
2. the engine (:class:`~tpm_fed.service.runtime.Runtime`: the ledger opened,
   what a predecessor left reserved settled, the sweeper started);
3. the metrics, and the serving objects a batch line may run (without an
   observer: the runner observes each line itself);
4. the batch runner, with those routes injected (it resumes the batches a
   stopped service left in progress);
5. the vector stores (their files are uploads of the batch store; ingestion
   resumes what a stopped service left queued);
6. the serving objects the routes use (chat and responses search the stores),
   read by the routes through a typed getter (:func:`serving_of`; the batch and store routes read
   the runner and the stores through their own, ``_runner`` and ``_stores``).

:meth:`ServiceAssembly.close` takes them down in reverse: the stores' ingestion
stops, the runner's lines in flight finish and are recorded, then the engine
stops its sites; the hub goes last, with nothing left to feed it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from fastapi import Request

from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.runner import BatchRunner
from tpm_fed.batches.store import BatchStore
from tpm_fed.engine.interface import Callers
from tpm_fed.home import TpmHome
from tpm_fed.service.back_channel_hub import BackChannelHub
from tpm_fed.service.metrics import ServiceMetrics
from tpm_fed.service.runtime import Runtime
from tpm_fed.service.serving_chat import ServingChat
from tpm_fed.service.serving_completions import ServingCompletions
from tpm_fed.service.serving_embeddings import ServingEmbeddings
from tpm_fed.service.serving_responses import ServingResponses
from tpm_fed.service.slo import SloTracker
from tpm_fed.stores.service import Stores


@dataclass(frozen=True)
class RouteServing:
    """The serving objects of the OpenAI routes, built once (each observed by the service's metrics)."""

    completions: ServingCompletions
    chat: ServingChat
    embeddings: ServingEmbeddings
    responses: ServingResponses


class ServiceAssembly:
    """One service's parts (see the module's docstring); ``with ServiceAssembly(home) as service:``.

    Args: as :class:`~tpm_fed.service.runtime.Runtime`'s (the engine's).
    """

    def __init__(self, home: TpmHome, *, database_url: str | None = None, owner: str | None = None,
                 callers: Callers | None = None) -> None:
        self._teardown = ExitStack()
        self.channels = BackChannelHub()
        self.engine = Runtime(home, database_url=database_url, owner=owner, callers=callers, channels=self.channels)
        self._teardown.callback(self.engine.close)
        try:
            self.slo = SloTracker(lambda: self.engine.federation.slos)
            self.metrics = ServiceMetrics(self.engine, self.slo)
            self.line_routes = LineRoutes({"/v1/completions": ServingCompletions(self.engine),
                                           "/v1/chat/completions": ServingChat(self.engine),
                                           "/v1/embeddings": ServingEmbeddings(self.engine)})
            self.batches = BatchRunner(self.engine, BatchStore(self.engine.ledger.engine), self.line_routes,
                                       observer=self.metrics).start()
            self._teardown.callback(self.batches.stop)  # its lines in flight finish before the engine closes
            self.stores = Stores(self.engine, self._read_upload, home.root / "stores",
                                 filename_of=lambda file_id, identity: self.batches.store.file(file_id, identity).filename)
            self._teardown.callback(self.stores.close)
            self.serving = RouteServing(
                completions=ServingCompletions(self.engine, self.metrics, self.channels),
                chat=ServingChat(self.engine, self.metrics, self.channels, stores=self.stores),
                embeddings=ServingEmbeddings(self.engine, self.metrics),
                responses=ServingResponses(self.engine, self.stores, self.metrics))
        except BaseException:
            self.close()
            raise

    def _read_upload(self, file_id: str, identity: str) -> bytes:
        return b"".join(self.batches.store.file_content(file_id, identity))

    def close(self) -> None:
        """Take the parts down in reverse of their building (each once; safe to call again)."""
        self._teardown.close()

    def __enter__(self) -> ServiceAssembly:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Typed getters for the routes (FastAPI dependencies; async, so no route pays a thread hop for them).

def assembly_of(request: Request) -> ServiceAssembly:
    return request.app.state.service


async def serving_of(request: Request) -> RouteServing:
    """The routes' serving objects (a FastAPI dependency: ``Depends(serving_of)``)."""
    return assembly_of(request).serving
