"""The federation runtime the service owns: broker, ledger, replica registry, dispatchers, sites.

For each request it checks the request at the edge, pins it to an exact
model version, resolves who pays (the caller's identity, from the service's
authentication, and their project), asks the broker for a replica, and hands
the request to the dispatcher for that replica. When the batch comes back,
the bookkeeper settles the charges, updates the replica and logs the
outcomes. Sites start on first use and stay up, with their warm replicas,
until the runtime closes. One runtime serves every caller of a service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from typing import Any

from tpm_fed.bookkeeping import Bookkeeper
from tpm_fed.broker import Broker, Decision, PlacementRequest, ReplicaRegistry
from tpm_fed.catalog import ModelCatalog
from tpm_fed.engine.dispatcher import BatchingDispatcher
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.ledger import Ledger, Metered, estimate_usu, price_usu
from tpm_fed.ledger.sweeper import SWEEP_PERIOD_S, ReservationSweeper
from tpm_fed.protocol.adapter_registry import AdapterRegistry
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, TpmError, UnknownModel
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.protocol.limits import MAX_RESULT_BYTES, check_request_size
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import (
    EmbeddingRequest, GenerationRequest, ModelRef, ServingRequest, TraceRequest, UsageBound,
)
from tpm_fed.protocol.results import EmbeddingResult, GenerationResult, ServedResult, SessionResult, TraceResult
from tpm_fed.protocol.sessions import SessionRequest
from tpm_fed.references.records import ReferenceRecords
from tpm_fed.service import reports
from tpm_fed.service.callers import Callers, LocalCallers
from tpm_fed.service.federation_change import FederationEdit, plan_change
from tpm_fed.sites import Site, SiteStatus, build_site
from tpm_fed.state import RequestLog, open_database

logger = logging.getLogger(__name__)


class Runtime:
    """One federation, running: what ``tpm serve`` serves.

    Args:
        home: The tpm home (federation file, models, site run folders).
        database_url: The one ledger's database; the home's SQLite by default.
        owner: The identity in-process calls run as when they name none (the home's owner).
        callers: What the runtime asks about a caller besides their name: their Globus
            Groups, and a Globus Compute client acting as them for bring-your-own sites
            (:class:`~tpm_fed.service.callers.LocalCallers` by default: neither).

    Example (in-process, as tests and benchmarks use it):
        >>> with Runtime(home) as runtime:
        ...     result = runtime.generate("The telescope", max_new_tokens=16).result()
    """

    def __init__(self, home: TpmHome, *, database_url: str | None = None, owner: str | None = None,
                 callers: Callers | None = None) -> None:
        self.home = home
        self.callers: Callers = callers or LocalCallers()
        self.federation = Federation.load(self.home.federation_file)
        self.catalog = ModelCatalog(self.federation)
        self.owner = owner or LocalUser().current()
        database = open_database(database_url or self.home.database_url)
        self.log = RequestLog(database)
        self.ledger = Ledger(database)
        self.broker = Broker(self.federation, self.ledger, ReplicaRegistry(database))
        self.references = ReferenceRecords(database, self._result_store_of)
        self._bookkeeper = Bookkeeper(self.log, self.broker, self.references)
        self._sites: dict[str, Site] = {}
        self._dispatchers: dict[str, BatchingDispatcher] = {}
        # Sites reached as the caller (byo Globus Compute): one site and dispatcher per caller.
        self._sites_as_caller: dict[tuple[str, str], tuple[SiteConfig, Site]] = {}  # (site, identity) -> made from
        self._dispatchers_as_caller: dict[tuple[str, str], BatchingDispatcher] = {}
        self._replaced_as_caller: list[Site] = []
        self._lock = threading.Lock()
        self._change_lock = threading.Lock()  # one federation change at a time (read, edit, write the file)
        self._retiring: list[Site] = []  # stopped sites finishing the work they had
        self._closed = False
        self.streams: Any = None
        """The service's back channel for streamed text (:class:`tpm_fed.service.stream_hub.StreamHub`)."""
        self.batches: Any = None
        """The service's batch runner (:class:`tpm_fed.batches.runner.BatchRunner`), once it serves."""
        self._bursts = 0  # callers placing a burst of requests that should leave together (see burst)
        self._watch(self.federation.sites)
        self._retried: set[str] = set()  # requests on their second try after a lost task
        # Reservations a predecessor left held (it stopped mid-request) are settled or released
        # now; later ones that outlive their deadline, every SWEEP_PERIOD_S.
        self.sweeper = ReservationSweeper(self.ledger, self.log, lambda: self.federation.prices,
                                          self._bookkeeper.in_flight)
        self.sweeper.sweep()
        self._stop_sweeping = threading.Event()
        threading.Thread(target=self._sweep_periodically, name="tpm-sweeper", daemon=True).start()

    def _watch(self, sites: list[SiteConfig]) -> None:
        for config in sites:
            # An offline endpoint is skipped before a request is placed there.
            self.broker.health.watch(config.name, lambda name=config.name: self._probe(name))

    def _probe(self, name: str) -> str | None:
        """Why site ``name`` should take no work now (None: go ahead)."""
        if self._client_as_caller(self.federation.site(name), self.owner) is not None:
            # Reached as each caller: the service's own identity may not even see the endpoint;
            # a caller's submission names an offline endpoint in its own error.
            return None
        return self.site(name).problem()

    # ----- in-process conveniences (the service's routes call submit) -------------
    def generate(self, prompts: str | list[str], model: str | None = None, *, identity: str | None = None,
                 **params: Any) -> Future[GenerationResult]:
        """Generate text (see :class:`~tpm_fed.protocol.requests.GenerationRequest` for ``params``)."""
        request = GenerationRequest.create(prompts, model or self.default_model(), **params)
        return self.submit(request, identity)

    def trace(self, prompts: str | list[str], model: str | None = None, *, identity: str | None = None,
              **params: Any) -> Future[TraceResult]:
        """Run prompts while reading and writing activations (see :class:`TraceRequest`)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.submit(TraceRequest.create(model or self.default_model(), prompts=prompts, **params), identity)

    def embed(self, inputs: list[Any], model: str | None = None, *, identity: str | None = None,
              **params: Any) -> Future[EmbeddingResult]:
        """Run data through adapters and the shared core (see :class:`EmbeddingRequest`)."""
        from tpm_fed.protocol.tensors import TensorData

        try:
            tensors = [value if isinstance(value, TensorData) else TensorData.of(value) for value in inputs]
        except ValueError as error:
            raise InvalidRequest(f"inputs: {error}") from None
        return self.submit(EmbeddingRequest.create(model or self.default_model(), inputs=tensors, **params), identity)

    def session(self, steps: list[Any], model: str | None = None, *, identity: str | None = None,
                **params: Any) -> Future[SessionResult]:
        """Run traces in order on one replica, later ones using what earlier ones saved (see :class:`SessionRequest`)."""
        return self.submit(SessionRequest.create(model or self.default_model(), steps=steps, **params), identity)

    # ----- serving ---------------------------------------------------------------
    def submit(self, request: ServingRequest, identity: str | None = None, *,
               background: bool = False) -> Future[ServedResult]:
        """Admit a request of any kind for ``identity`` (the owner by default).

        Edge checks and placement raise here (nothing charged); what happens at
        the site fails the future. A ``background`` request (a batch's line) leaves
        its replica's queue after every interactive one.
        """
        if self._closed:
            raise RuntimeError("this runtime is closed")
        identity = identity or self.owner
        if not isinstance(request, ServingRequest):
            raise InvalidRequest(f"expected a tpm-fed request (generate, trace or embed), got {type(request).__name__}")
        nbytes = check_request_size(request)
        resolved = self.catalog.resolve(request.model)
        request, spec, bound = self._check(request, resolved)
        price = self.federation.prices.of(request.kind)
        # Placed here, reserved with its batch when the batch leaves (one transaction per batch).
        admission = self.broker.place(request.request_id, self._placement(request, spec, price, bound, identity))
        self._bookkeeper.admitted(admission, price)
        try:
            self._forget_dispatchers([admission.replaced] if admission.replaced else [])
            self._reap_idle()
            dispatcher = self._dispatcher(admission.replica_id, self.federation.site(admission.site), spec,
                                          identity)
        except BaseException:
            self._bookkeeper.forget(admission)
            raise
        # A batch must fit in one task both ways: count what the answer may carry too (a result
        # too large for a task comes by reference, but then it travels alone).
        return dispatcher.submit(request, nbytes + min(bound.result_bytes, MAX_RESULT_BYTES), background=background)

    @contextmanager
    def burst(self) -> Iterator[None]:
        """Requests submitted inside leave for their replicas together, in full tasks, once the block ends
        (a batch's window of lines), instead of the first few alone while the rest are still being placed.
        A full task still leaves at once; nothing is held more than ``MAX_HOLD_S``."""
        with self._lock:
            self._bursts += 1
        try:
            yield
        finally:
            with self._lock:
                self._bursts -= 1
                dispatchers = [*self._dispatchers.values(), *self._dispatchers_as_caller.values()]
            for dispatcher in dispatchers:
                dispatcher.nudge()

    def add_outcome_writer(self, writer: Callable[[dict[str, Any], Any], None]) -> None:
        """Have ``writer(outcomes, db)`` write in each batch's outcomes transaction, with the charges
        (the batch runner keeps its lines' results there: durable exactly when their charges are)."""
        self._bookkeeper.outcome_writers.append(writer)

    def explain(self, request: ServingRequest, identity: str | None = None) -> Decision:
        """What the broker would decide for ``request`` (nothing is reserved or run)."""
        return self.broker.decide(self._priced(request, identity))

    def quote(self, request: ServingRequest, identity: str | None = None) -> Quote:
        """The most ``request`` would be charged, and when it would be done (nothing is reserved or run).

        Raises:
            InvalidRequest, PlacementRefused, InsufficientBalance, ...: As :meth:`submit` would.
        """
        check_request_size(request)
        return self.broker.quote(self._priced(request, identity))

    def _priced(self, request: ServingRequest, identity: str | None) -> PlacementRequest:
        """The edge checks of :meth:`submit`, then what placement needs to know, priced."""
        request, spec, bound = self._check(request, self.catalog.resolve(request.model))
        price = self.federation.prices.of(request.kind)
        return self._placement(request, spec, price, bound, identity or self.owner)

    def _reroute(self, lost: list[tuple[ServingRequest, BaseException]], spec: ModelSpec
                 ) -> dict[str, Future[ServedResult]]:
        """Place the requests of a task lost with its worker or site once more; those not returned fail.

        Not a request whose caller named the site (placement may not choose
        another), nor one on its second try already. Each keeps its reservation
        (charged once, at most its first estimate); see :meth:`Broker.replace_lost`.
        """
        movable = []
        with self._lock:
            for request, error in lost:
                admission = self._bookkeeper.admission_of(request.request_id)
                if admission is None or request.site is not None or self._closed \
                        or request.request_id in self._retried:
                    continue
                self._retried.add(request.request_id)
                movable.append((request, error, admission))
        per_replica: dict[str, int] = {}
        for _, _, admission in movable:
            per_replica[admission.replica_id] = per_replica.get(admission.replica_id, 0) + 1
        for replica_id, count in per_replica.items():
            self.broker.replica_lost(replica_id, count)
        second_tries: dict[str, Future[ServedResult]] = {}
        for request, error, first in movable:
            try:
                admission = self.broker.replace_lost(first)
            except TpmError as why:
                logger.warning("request %s, lost with its task (%s), could not be placed again: %s",
                               request.request_id, error, why)
                with self._lock:
                    self._retried.discard(request.request_id)
                continue
            self._bookkeeper.replaced(admission)
            self._forget_dispatchers([admission.replaced] if admission.replaced else [])
            dispatcher = self._dispatcher(admission.replica_id, self.federation.site(admission.site), spec,
                                          first.request.identity)
            second_try = dispatcher.submit(request)
            second_try.add_done_callback(lambda _, rid=request.request_id: self._retried.discard(rid))
            second_tries[request.request_id] = second_try
        return second_tries

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

    # ----- changing the federation while it runs ------------------------------------
    def change_federation(self, edit: FederationEdit) -> Federation:
        """Apply an operator's change to the federation without stopping what it leaves alone.

        ``edit`` changes the federation file's plain data; the whole is
        validated again, written atomically, and adopted: the catalog and the
        broker see the new federation and the ledger its grants. A site that is
        unchanged keeps its engine and warm replicas. A site that changed or is
        gone is stopped: its replicas are marked stopped at once (no new work
        reaches them), and its engine shuts down once the work it already has
        is done, so requests in flight finish. Returns the federation now served.

        Raises:
            FederationConfigError: The change makes an invalid federation (nothing is written or changed).
        """
        with self._change_lock:
            change = plan_change(self.home.federation_file, self.federation, edit)
            change.write(self.home.federation_file)
            with self._lock:
                self.federation = change.loaded
                self.catalog = self.catalog.for_federation(change.loaded)
                self.broker.use(change.loaded)
                stopping = [r.replica_id for r in self.broker.registry.all()
                            if r.live and r.site in change.stopped_sites]
                for replica_id in stopping:
                    self._dispatchers.pop(replica_id, None)
                for key in [k for k in self._dispatchers_as_caller if k[0] in stopping]:
                    del self._dispatchers_as_caller[key]  # their sites are rebuilt when their config changed
                retired = [self._sites.pop(name) for name in sorted(change.stopped_sites) if name in self._sites]
                self._retiring.extend(retired)
            self.broker.registry.set_state(stopping, "stopped")
            self._watch(change.loaded.sites)  # new sites get a probe (watching one again replaces it)
        for site in retired:
            threading.Thread(target=self._retire, args=(site, stopping), name=f"tpm-retire-{site.name}",
                             daemon=True).start()
        return change.loaded

    def _retire(self, site: Site, replica_ids: list[str], grace_s: float = 900.0) -> None:
        """Stop ``site`` once its tasks and its replicas' queued requests are done (or after ``grace_s``)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not self._closed:
            queued = sum(r.queue_depth for r in map(self.broker.registry.get, replica_ids)
                         if r is not None and r.site == site.name)
            if not queued and not site.status().outstanding_tasks:
                break
            time.sleep(0.1)
        with self._lock:
            if site not in self._retiring:  # close() stopped it already
                return
            self._retiring.remove(site)
        site.shutdown()
        self.log.site_stopped(site.name)

    # ----- what callers may read (views in tpm_fed.service.reports) ----------------
    def model_cards(self) -> list[dict[str, Any]]:
        return reports.model_cards(self)

    def request_record(self, request_id: str) -> dict[str, Any] | None:
        return reports.request_record(self, request_id)

    def statement(self, project: str, since: float | None = None) -> list[dict[str, Any]]:
        return reports.statement(self, project, since)

    def balances(self, project: str) -> list[dict[str, Any]]:
        return reports.balances(self, project)

    def sites_report(self) -> dict[str, Any]:
        return reports.sites_report(self)

    def points(self, model: str | None = None) -> PointCatalog:
        """Every hookable point of ``model`` with its shape (read from its config alone)."""
        return self.catalog.points(self.catalog.resolve(ModelRef.parse(model) if model else self.default_model()).spec)

    @property
    def adapters(self) -> AdapterRegistry:
        """The federation's adapter registry (input modules and heads for mode 2)."""
        return AdapterRegistry(self.federation.store / "adapters")

    def _check(self, request: ServingRequest, resolved) -> tuple[ServingRequest, ModelSpec, UsageBound]:
        """Kind-specific edge checks: the request (adapters pinned), the spec to run, its usage bound."""
        spec = resolved.spec
        if isinstance(request, GenerationRequest):
            self.catalog.check(request, resolved)
            if request.backend is not None and request.backend != spec.backend:
                spec = spec.model_copy(update={"backend": request.backend})
            return request, spec, request.usage_bound()
        served_by = KINDS[request.kind].backends  # the backends with the capability this kind needs
        if spec.backend not in served_by:
            spec = spec.model_copy(update={"backend": served_by[0]})
        if request.kind == "session":
            from tpm_fed.protocol.validation import check_session

            return request, spec, check_session(request, self.catalog.points(spec), spec.dtype)
        if request.kind == "trace":
            from tpm_fed.protocol.validation import check_trace

            return request, spec, check_trace(request, self.catalog.points(spec), spec.dtype)
        from tpm_fed.adapters.check import pin_adapters

        pinned, bound = pin_adapters(request, self.adapters, self.catalog.hidden_size(spec))
        return pinned, spec, bound

    def _placement(self, request: ServingRequest, spec: ModelSpec, price, bound: UsageBound,
                   identity: str) -> PlacementRequest:
        location = request.location or self.federation.default_location
        if location not in self.federation.latency_ms and location != self.federation.default_location:
            known = sorted(set(self.federation.latency_ms) | {self.federation.default_location})
            raise InvalidRequest(f"location: unknown location {location!r}; known: {', '.join(known)}")
        return PlacementRequest(
            identity=identity,
            project=self.project_for(identity, request.project),
            model=spec.name,
            version=spec.version,
            kind=request.kind,
            location=location,
            estimate_usu=estimate_usu(price, bound, cold_start=False),
            cold_start_usu=price_usu(price, Metered(cold_start=True)),
            site=request.site,
            backend=spec.backend,
            own_site_only=request.runs_user_code,
        )

    def project_for(self, identity: str, asked: str | None) -> str:
        """The project ``identity`` charges (``asked``, or their only project)."""
        if asked is not None:
            if not self._member_of(identity, asked):
                raise NotPermitted(f"{identity!r} is not a member of project {asked!r}")
            return asked
        mine = self.projects_of(identity)
        if not mine:
            raise NotPermitted(f"{identity!r} is not a member of any project of this federation")
        if len(mine) > 1:
            raise InvalidRequest(f"project: {identity!r} is in several projects ({', '.join(mine)}); name one")
        return mine[0]

    def projects_of(self, identity: str) -> list[str]:
        """The projects ``identity`` is a member of: listed, or by Globus Group (asked only if a project has one)."""
        groups = self.callers.groups_of(identity) if self.federation.uses_groups else frozenset()
        return [project.name for project in self.federation.projects_of(identity, groups)]

    def _member_of(self, identity: str, name: str) -> bool:
        """Whether ``identity`` may charge project ``name`` (Groups is asked only when the list does not say)."""
        project = next((p for p in self.federation.projects if p.name == name), None)
        if project is None:
            return False
        if identity in project.members or project.globus_group is None:
            return identity in project.members
        return project.admits(identity, self.callers.groups_of(identity))

    def all_projects(self) -> list[str]:
        return [project.name for project in self.federation.projects]

    def default_model(self) -> ModelRef:
        if not self.federation.models:
            raise UnknownModel(f"the federation in {self.home.federation_file} serves no models")
        return ModelRef(name=self.federation.models[0].name)

    def _dispatcher(self, replica_id: str, site_config: SiteConfig, spec: ModelSpec,
                    identity: str | None = None) -> BatchingDispatcher:
        as_caller = self._client_as_caller(site_config, identity)
        with self._lock:
            if as_caller is not None and identity is not None:
                # Reached as the caller: a batch is one caller's, so their tasks run under their account.
                key = (replica_id, identity)
                if key not in self._dispatchers_as_caller:
                    site = self._site_as_caller(site_config, identity, as_caller)
                    self._dispatchers_as_caller[key] = self._new_dispatcher(site, site_config, spec)
                return self._dispatchers_as_caller[key]
            if replica_id not in self._dispatchers:
                self._dispatchers[replica_id] = self._new_dispatcher(self._site(site_config), site_config, spec)
            return self._dispatchers[replica_id]

    def _client_as_caller(self, site_config: SiteConfig, identity: str | None) -> Callable[[], Any] | None:
        """A Globus Compute client factory acting as ``identity``, for a byo site reached through Globus Compute.

        A byo endpoint maps the submitting identity to an account on the owner's
        allocation, so the caller's own identity must submit there. Shared (rcc)
        sites, and callers with local identities, use the service's own credentials.
        """
        if identity is None or site_config.billing != "byo" or site_config.access != "globus-compute":
            return None
        return self.callers.compute_client_factory(identity)

    def _site_as_caller(self, config: SiteConfig, identity: str, client_factory: Callable[[], Any]) -> Site:
        """Called under the lock: ``identity``'s own connection to a byo Globus Compute site."""
        from tpm_fed.sites.globus_compute import GlobusComputeSite

        key = (config.name, identity)
        made = self._sites_as_caller.get(key)
        if made is not None and made[0] == config:
            return made[1]
        if made is not None:
            self._replaced_as_caller.append(made[1])  # its entry changed: its tasks finish, close() stops it
        site = GlobusComputeSite(config, client_factory=client_factory)
        self._sites_as_caller[key] = (config, site)
        return site

    def _new_dispatcher(self, site: Site, site_config: SiteConfig, spec: ModelSpec) -> BatchingDispatcher:
        return BatchingDispatcher(
            site,
            spec,
            max_batch=site_config.max_batch_requests,
            max_in_flight=site_config.capacity.max_replicas,
            linger_s=site_config.batch_linger_ms / 1000,
            task_timeout_s=site_config.task_timeout_s,
            admit_for_s=min(site_config.admit_for_s, site_config.task_timeout_s / 4),
            listener=self._bookkeeper,
            # Only what the worker checks: permissions are its endpoint's policy, never a task's.
            context={"code_version": serving_code_version()},
            rerouter=self._reroute,
            streams=lambda: self.streams,  # set by the service once it serves (build_app)
            held=lambda: self._bursts > 0,
        )

    def _reap_idle(self) -> None:
        self._forget_dispatchers(self.broker.reap_idle())

    def _forget_dispatchers(self, replica_ids: list[str]) -> None:
        """Stopped replicas get no more work; their worker frees them on its next load."""
        with self._lock:
            for replica_id in replica_ids:
                self._dispatchers.pop(replica_id, None)
            for key in [k for k in self._dispatchers_as_caller if k[0] in replica_ids]:
                del self._dispatchers_as_caller[key]

    def _site(self, config: SiteConfig) -> Site:
        if config.name not in self._sites:
            from tpm_fed.sites.local import model_roots_of

            self._sites[config.name] = build_site(config, self.home.sites_dir,
                                                  model_roots=model_roots_of(self.federation, self.home.models_dir))
        return self._sites[config.name]

    def site(self, name: str | None = None) -> Site:
        """A site of the federation (started on first submit)."""
        config = self.federation.site(name) if name else self.federation.sites[0]
        with self._lock:
            return self._site(config)

    def queue_place(self, request_id: str) -> dict[str, Any] | None:
        """A request still waiting for its replica: its place in the queue and estimated start.

        None when it is not waiting (unknown, or already sent: the request log has it then).
        """
        admission = self._bookkeeper.admission_of(request_id)
        if admission is None:
            return None
        with self._lock:
            dispatcher = self._dispatchers.get(admission.replica_id) or self._dispatchers_as_caller.get(
                (admission.replica_id, admission.request.identity))
        position = dispatcher.position(request_id) if dispatcher is not None else None
        if position is None:
            return None
        replica = self.broker.registry.get(admission.replica_id)
        service_s = replica.service_s if replica is not None else self.federation.site(admission.site).cold_start_s
        return {
            "request_id": request_id, "identity": admission.request.identity, "project": admission.project,
            "model": admission.request.model, "version": admission.request.version, "kind": admission.request.kind,
            "site": admission.site, "replica": admission.replica_id, "status": "waiting",
            "queue_position": position, "estimated_start_s": dispatcher.estimated_start_s(position, service_s),
        }

    def waiting_per_replica(self) -> dict[str, int]:
        """Requests admitted to each replica that no task carries yet (the rest of its queue runs)."""
        with self._lock:
            dispatchers = [*self._dispatchers.items(), *((key[0], d) for key, d in self._dispatchers_as_caller.items())]
        waiting: dict[str, int] = {}
        for replica_id, dispatcher in dispatchers:
            waiting[replica_id] = waiting.get(replica_id, 0) + dispatcher.waiting
        return waiting

    def status(self) -> list[SiteStatus]:
        with self._lock:
            started = dict(self._sites)
        return [
            started[c.name].status() if c.name in started
            else SiteStatus(c.name, c.access, "stopped", c.capacity.max_replicas, 0)
            for c in self.federation.sites
        ]

    def close(self) -> None:
        """Stop every site this runtime started; their replicas go with them."""
        if self.batches is not None:
            self.batches.stop()  # batch lines in flight finish (and are recorded) before the sites stop
        self._stop_sweeping.set()
        with self._lock:
            self._closed = True
            sites, self._sites = self._sites, {}
            retiring, self._retiring = self._retiring, []
            self._dispatchers.clear()
            as_caller = [site for _, site in self._sites_as_caller.values()] + self._replaced_as_caller
            self._sites_as_caller.clear()
            self._dispatchers_as_caller.clear()
        for site in as_caller:
            site.shutdown()
        for site in retiring:
            site.shutdown()
        for name, site in sites.items():
            site.shutdown()
            self.log.site_stopped(name)
            self.broker.registry.set_state(
                [r.replica_id for r in self.broker.registry.all() if r.site == name and r.live], "stopped"
            )

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
