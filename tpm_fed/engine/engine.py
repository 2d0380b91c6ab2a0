"""The federation engine: edge checks, placement, the replica pool and the ledger, behind one interface.

For each request it checks the request at the edge, pins it to an exact
model version, resolves who pays (the caller's identity and project), asks
the broker for a replica, and hands the request to that replica's dispatcher.
When the task comes back the bookkeeper settles the charges, updates the
replica and logs the outcomes. The constructor reads the federation file and
nothing else: :meth:`Engine.start` opens the database, settles what a
predecessor left reserved and starts the sweeper; :meth:`Engine.close` stops
them and the sites, in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tpm_fed.bookkeeping import Bookkeeper
from tpm_fed.broker import Broker, Decision, PlacementRequest, ReplicaRegistry
from tpm_fed.catalog import ModelCatalog
from tpm_fed.engine.edge_checks import check_at_edge
from tpm_fed.engine.interface import Callers, TaskChannels
from tpm_fed.engine.federation_change import FederationEdit, plan_change
from tpm_fed.engine.projects import Projects
from tpm_fed.engine.replica_pool import ReplicaPool
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.ledger import Ledger, Metered, estimate_usu, price_usu
from tpm_fed.ledger.sweeper import SWEEP_PERIOD_S, ReservationSweeper
from tpm_fed.storage.adapter_registry import AdapterRegistry
from tpm_fed.protocol.errors import InvalidRequest, TpmError, UnknownModel
from tpm_fed.protocol.limits import MAX_RESULT_BYTES, check_request_size
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import ModelRef, ServingRequest, UsageBound
from tpm_fed.protocol.results import ServedResult
from tpm_fed.references.records import ReferenceRecords
from tpm_fed.sites import Site, SiteStatus
from tpm_fed.state import RequestLog, open_database

logger = logging.getLogger(__name__)


class Engine:
    """One federation, running (see :class:`tpm_fed.engine.interface.EngineClient`).

    Args:
        home: The tpm home (federation file, models, site run folders).
        owner: The identity calls run as when they name none (the home's owner).
        callers: What the engine asks about a caller besides their name: their Globus Groups
            (``groups_of``) and a Globus Compute client acting as them (``compute_client_factory``).
        database_url: The one ledger's database; the home's SQLite by default.
        channels: The service's back channel (streamed text, requests joining running tasks); None when
            the engine runs in-process only.
    """

    def __init__(self, home: TpmHome, *, owner: str, callers: Callers, database_url: str | None = None,
                 channels: TaskChannels | None = None) -> None:
        self.home, self.owner, self.callers = home, owner, callers
        self.database_url = database_url or home.database_url
        self.federation = Federation.load(home.federation_file)
        self.catalog = ModelCatalog(self.federation)
        self.projects = Projects(lambda: self.federation, callers)
        self.channels = channels
        """The service's back channel, handed here by the composition root (None: in-process only)."""
        self._change_lock = threading.Lock()  # one federation change at a time (read, edit, write the file)
        self._adapters: tuple[Federation | None, AdapterRegistry | None] = (None, None)  # (made for, registry)
        self._stop_sweeping = threading.Event()
        self._closed = False
        # Where a batch submitted from the event loop is reserved and sent (threads start on first use).
        self._sending = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tpm-send")

    def start(self) -> Engine:
        """Open the ledger, settle what a predecessor left reserved, start the periodic sweep."""
        database = open_database(self.database_url)
        self.log = RequestLog(database)
        self.ledger = Ledger(database)
        self.broker = Broker(self.federation, self.ledger, ReplicaRegistry(database))
        self.references = ReferenceRecords(database, self._result_store_of)
        self._bookkeeper = Bookkeeper(self.log, self.broker, self.references)
        self.pool = ReplicaPool(self.home, lambda: self.federation, self.broker, self._bookkeeper, self.log,
                                self.callers.compute_client_factory, self.channels)
        self._watch(self.federation.sites)
        # Reservations a predecessor left held (it stopped mid-request) are settled or released now;
        # later ones that outlive their deadline, every SWEEP_PERIOD_S.
        self.sweeper = ReservationSweeper(self.ledger, self.log, lambda: self.federation.prices,
                                          self._bookkeeper.in_flight)
        self.sweeper.sweep()
        threading.Thread(target=self._sweep_periodically, name="tpm-sweeper", daemon=True).start()
        return self

    def _watch(self, sites: list[SiteConfig]) -> None:
        for config in sites:  # an offline endpoint is skipped before a request is placed there
            self.broker.health.watch(config.name, lambda name=config.name: self._probe(name))

    def _probe(self, name: str) -> str | None:
        """Why site ``name`` should take no work now (None: go ahead)."""
        if self.pool.client_as_caller(self.federation.site(name), self.owner) is not None:
            # Reached as each caller: the service's own identity may not even see the endpoint.
            return None
        return self.pool.site(name).problem()

    def submit(self, request: ServingRequest, identity: str | None = None, *,
               background: bool = False) -> Future[ServedResult]:
        """Admit a request of any kind for ``identity`` (the owner by default).

        Edge checks and placement raise here (nothing charged); what happens at the site fails the
        future. A ``background`` request (a batch's line) leaves its replica's queue after every
        interactive one.
        """
        request, admission, spec, size = self._place(request, identity)
        return self._submit_placed(request, admission, spec, size, background)

    async def submit_async(self, request: ServingRequest, identity: str | None = None, *,
                           background: bool = False) -> Future[ServedResult]:
        """As :meth:`submit`, on the event loop without a thread hop: edge checks, placement and the queue
        are in memory (placement reads the ledger's balances at most once a second, and writes once for a
        new replica; a batch leaves from the dispatcher's clock after its linger). What may block runs
        elsewhere: a replica's first dispatcher (its site may start) in a thread, and a batch that leaves
        at once on the engine's sending threads."""
        request, admission, spec, size = self._place(request, identity)
        try:  # in memory, but for the rare idle replica stopped now (one write)
            self.pool.forget(self.broker.reap_idle())
            dispatcher = self.pool.made_dispatcher(admission)
        except BaseException:
            self._bookkeeper.forget(admission)
            raise
        if dispatcher is None:  # placed already: submitted in the thread even if this caller is cancelled
            return await asyncio.shield(asyncio.to_thread(self._submit_placed, request, admission, spec, size,
                                                          background))
        return self.pool.submit(dispatcher, request, size, background=background, send_on=self._sending)

    def _submit_placed(self, request: ServingRequest, admission: Any, spec: ModelSpec, size: int,
                       background: bool) -> Future[ServedResult]:
        return self.pool.submit(self._dispatcher(admission, spec), request, size, background=background)

    def _place(self, request: ServingRequest, identity: str | None) -> tuple[ServingRequest, Any, ModelSpec, int]:
        """Edge checks and placement (raise here, nothing charged): the request to run, its admission,
        its model version, and its size in a task both ways."""
        if self._closed:
            raise RuntimeError("this engine is closed")
        identity = identity or self.owner
        if not isinstance(request, ServingRequest):
            raise InvalidRequest(f"expected a tpm-fed request (generate, trace or embed), got {type(request).__name__}")
        nbytes = check_request_size(request)
        request, spec, bound = check_at_edge(request, self.catalog.resolve(request.model), self.catalog,
                                             self.adapters)
        price = self.federation.prices.of(request.kind)
        # Placed here, reserved with its batch when the batch leaves (one transaction per batch).
        admission = self.broker.place(request.request_id, self._placement(request, spec, price, bound, identity))
        self._bookkeeper.admitted(admission, price)
        # A batch must fit in one task both ways: count what the answer may carry too (a result
        # too large for a task comes by reference, but then it travels alone).
        return request, admission, spec, nbytes + min(bound.result_bytes, MAX_RESULT_BYTES)

    def _dispatcher(self, admission: Any, spec: ModelSpec) -> Any:
        """The dispatcher of ``admission``'s replica (made, and its site started, on first use)."""
        try:
            self.pool.forget(self.broker.reap_idle())
            return self.pool.dispatcher(admission, spec)
        except BaseException:
            self._bookkeeper.forget(admission)
            raise

    def burst(self) -> Any:
        """Requests submitted inside leave for their replicas together, in full tasks, once the block ends
        (a batch's window of lines). A full task still leaves at once; nothing is held more than
        ``MAX_HOLD_S``."""
        return self.pool.burst()

    def add_outcome_writer(self, writer: Callable[[dict[str, Any], Any], None]) -> None:
        """Have ``writer(outcomes, db)`` write in each batch's outcomes transaction, with the charges."""
        self._bookkeeper.outcome_writers.append(writer)

    def explain(self, request: ServingRequest, identity: str | None = None) -> Decision:
        """What the broker would decide for ``request`` (nothing is reserved or run)."""
        return self.broker.decide(self._priced(request, identity))

    def quote(self, request: ServingRequest, identity: str | None = None) -> Quote:
        """The most ``request`` would be charged, and when it would be done (nothing reserved or run)."""
        check_request_size(request)
        return self.broker.quote(self._priced(request, identity))

    def quotes(self, requests: list[ServingRequest], identity: str | None = None) -> list[Quote | TpmError]:
        """Each request's quote as :meth:`quote` gives it (or the error it would raise), in one pass: the edge
        checks run per request, and requests that place alike (same caller, project, model version, kind,
        bound) share one broker decision, since quoting reserves and starts nothing (a batch's lines)."""
        decided: dict[PlacementRequest, Quote | TpmError] = {}
        quotes: list[Quote | TpmError] = []
        for request in requests:
            try:
                check_request_size(request)
                placement = self._priced(request, identity)
                if placement not in decided:
                    try:
                        decided[placement] = self.broker.quote(placement)
                    except TpmError as refused:  # the same refusal for every request that places alike
                        decided[placement] = refused
                quotes.append(decided[placement])
            except TpmError as error:
                quotes.append(error)
        return quotes

    def _priced(self, request: ServingRequest, identity: str | None) -> PlacementRequest:
        request, spec, bound = check_at_edge(request, self.catalog.resolve(request.model), self.catalog,
                                             self.adapters)
        return self._placement(request, spec, self.federation.prices.of(request.kind), bound,
                               identity or self.owner)

    def _placement(self, request: ServingRequest, spec: ModelSpec, price: Any, bound: UsageBound,
                   identity: str) -> PlacementRequest:
        location = request.location or self.federation.default_location
        if location not in self.federation.latency_ms and location != self.federation.default_location:
            known = sorted(set(self.federation.latency_ms) | {self.federation.default_location})
            raise InvalidRequest(f"location: unknown location {location!r}; known: {', '.join(known)}")
        return PlacementRequest(
            identity=identity, project=self.projects.project_for(identity, request.project), model=spec.name,
            version=spec.version, kind=request.kind, location=location,
            estimate_usu=estimate_usu(price, bound, cold_start=False),
            cold_start_usu=price_usu(price, Metered(cold_start=True)), site=request.site, backend=spec.backend,
            own_site_only=request.runs_user_code)

    def change_federation(self, edit: FederationEdit) -> Federation:
        """Apply an operator's change without stopping what it leaves alone: validated whole, written
        atomically, adopted by the catalog, the broker and the ledger. A changed or removed site stops
        taking work at once and shuts down once its work is done. Returns the federation now served.

        Raises:
            FederationConfigError: The change makes an invalid federation (nothing is written or changed).
        """
        with self._change_lock:
            change = plan_change(self.home.federation_file, self.federation, edit)
            change.write(self.home.federation_file)
            self.federation = change.loaded
            self.catalog = self.catalog.for_federation(change.loaded)
            self.broker.use(change.loaded)
            stopping = [r.replica_id for r in self.broker.registry.all()
                        if r.live and r.site in change.stopped_sites]
            self.pool.stop_sites(set(change.stopped_sites), stopping)
            self.broker.registry.set_state(stopping, "stopped")
            self._watch(change.loaded.sites)  # new sites get a probe (watching one again replaces it)
        return change.loaded

    def _sweep_periodically(self) -> None:
        while not self._stop_sweeping.wait(SWEEP_PERIOD_S):
            try:
                self.sweeper.sweep()
                self.references.evict_expired()
            except Exception:  # the database may be away for a while: the next pass tries again
                logger.exception("the periodic sweep failed")

    def _result_store_of(self, site: str) -> str | None:
        """The result store the federation file names for ``site`` (None: none, or no such site now)."""
        return next((config.results for config in self.federation.sites if config.name == site), None)

    @property
    def adapters(self) -> AdapterRegistry:
        """The federation's adapter registry (input modules and heads for mode 2): made once per federation
        served (its path costs more than the rest of a request's edge check; a batch's quote asks per line)."""
        federation, made = self._adapters
        if federation is not self.federation:
            federation, made = self._adapters = (self.federation, AdapterRegistry(self.federation.store / "adapters"))
        return made

    def default_model(self) -> ModelRef:
        if not self.federation.models:
            raise UnknownModel(f"the federation in {self.home.federation_file} serves no models")
        return ModelRef(name=self.federation.models[0].name)

    def points(self, model: str | None = None) -> PointCatalog:
        """Every hookable point of ``model`` with its shape (read from its config alone)."""
        return self.catalog.points(self.catalog.resolve(ModelRef.parse(model) if model else self.default_model()).spec)

    def project_for(self, identity: str, asked: str | None) -> str:
        return self.projects.project_for(identity, asked)

    def projects_of(self, identity: str) -> list[str]:
        return self.projects.projects_of(identity)

    def all_projects(self) -> list[str]:
        return self.projects.all_projects()

    def site(self, name: str | None = None) -> Site:
        """A site of the federation (started on first use)."""
        return self.pool.site(name)

    def status(self) -> list[SiteStatus]:
        return self.pool.status()

    def close(self) -> None:
        """Stop the sweeper and every site this engine started; their replicas go with them."""
        self._closed = True
        self._stop_sweeping.set()
        self._sending.shutdown(wait=True)  # batches being sent are out before their sites stop
        if hasattr(self, "pool"):  # started
            self.pool.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
