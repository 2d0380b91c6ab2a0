"""The Python API: ``Client().generate(...)`` returns a future of the result.

For each request a client checks it at the edge, pins it to an exact model
version, asks the broker for a replica (which reserves the request's service
units), and hands it to the dispatcher for that replica. When the batch comes
back, the bookkeeper settles the charge, updates the replica and logs the
outcome. Sites start on first use and stop when the client closes (it is a
context manager).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from tpm_fed.bookkeeping import Bookkeeper
from tpm_fed.broker import Broker, Decision, PlacementRequest, ReplicaRegistry
from tpm_fed.catalog import ModelCatalog
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.dispatch import BatchingDispatcher
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, UnknownModel
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import IdentityProvider, LocalUser
from tpm_fed.ledger import Ledger, Metered, estimate_usu, price_usu
from tpm_fed.protocol.limits import check_request_size
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.adapter_registry import AdapterRegistry
from tpm_fed.protocol.points import PointCatalog
from tpm_fed.protocol.requests import GenerationRequest, ModelRef, ServingRequest, UsageBound
from tpm_fed.protocol.results import EmbeddingResult, GenerationResult, TraceResult
from tpm_fed.sites import Site, SiteStatus, build_site
from tpm_fed.state import RequestLog, open_database

class Client:
    """Submit requests to a federation.

    Args:
        home: The tpm home folder; ``$TPM_HOME`` or ``~/.tpm`` by default.
        create_default: Create the embedded default federation in ``home``
            (federation file and demo model) if it has none.
        progress: Show progress bars while the default is being made.
        identity: Who is calling (the OS user by default).

    Example:
        >>> with Client() as client:
        ...     result = client.generate("The telescope", max_new_tokens=16).result()
        ...     print(result.texts[0], result.version, result.charge)
    """

    def __init__(
        self,
        home: TpmHome | None = None,
        *,
        create_default: bool = True,
        progress: bool = False,
        identity: IdentityProvider | None = None,
    ) -> None:
        self.home = home or TpmHome.default()
        if create_default:
            self.home.ensure_embedded_default(progress=progress)
        self.federation = Federation.load(self.home.federation_file)
        self.catalog = ModelCatalog(self.federation)
        self.identity = (identity or LocalUser()).current()
        database = open_database(self.home.database_url)
        self.log = RequestLog(database)
        self.ledger = Ledger(database)
        self.broker = Broker(self.federation, self.ledger, ReplicaRegistry(database))
        self._bookkeeper = Bookkeeper(self.log, self.broker)
        self._sites: dict[str, Site] = {}
        self._dispatchers: dict[str, BatchingDispatcher] = {}
        self._lock = threading.Lock()
        self._closed = False
        for config in self.federation.sites:
            # An offline endpoint is skipped before a request is placed there.
            self.broker.health.watch(config.name, lambda name=config.name: self.site(name).problem())

    def generate(self, prompts: str | list[str], model: str | None = None, **params: Any) -> Future[GenerationResult]:
        """Generate text for one prompt or a list of prompts.

        Args:
            prompts: A prompt or a list of prompts, answered together.
            model: ``NAME`` or ``NAME@VERSION``; the federation's first model by default.
            **params: :class:`~tpm_fed.request.GenerationRequest` fields
                (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
                ``project``, ``location``, ``site``, ``backend``).

        Raises:
            InvalidRequest: A parameter is malformed (raised here, not in the future).
            UnknownModel, UnknownVersion, ModelLoadError: The model cannot be served.
            NotPermitted, PlacementRefused, InsufficientBalance: The caller may not run it.
        """
        request = GenerationRequest.create(prompts, model or self.default_model(), **params)
        return self.submit(request)

    def trace(self, prompts: str | list[str], model: str | None = None, **params: Any) -> Future[TraceResult]:
        """Run prompts while reading and writing activations (mode 3).

        Args:
            prompts: A prompt or a list of prompts, run in one batch.
            model: ``NAME`` or ``NAME@VERSION``; the federation's first model by default.
            **params: :class:`~tpm_fed.interventions.TraceRequest` fields (``steps``,
                ``logit_lens``, ``attention_lens``, ``attention_patterns``,
                ``max_new_tokens``, ``python_hooks``, ``project``, ...).

        Example:
            >>> from tpm_fed.interventions import LogitLens, Save
            >>> result = client.trace("The telescope", steps=[Save(point="model.layers.2")],
            ...                       logit_lens=LogitLens(top_k=3)).result()
            >>> result.saved("model.layers.2.output").shape
        """
        from tpm_fed.interventions import TraceRequest

        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.submit(TraceRequest.create(model or self.default_model(), prompts=prompts, **params))

    def embed(self, inputs: list[Any], model: str | None = None, **params: Any) -> Future[EmbeddingResult]:
        """Run the caller's data through their adapters and the shared core (mode 2).

        Args:
            inputs: Arrays or tensors, ``[positions, features]`` (or ``[features]``).
            model: ``NAME`` or ``NAME@VERSION``; the federation's first model by default.
            **params: :class:`~tpm_fed.adapters.EmbeddingRequest` fields (``input_module``,
                ``head``, ``pool``, ``project``, ...).
        """
        from tpm_fed.adapters import EmbeddingRequest
        from tpm_fed.protocol.tensors import TensorData

        try:
            tensors = [value if isinstance(value, TensorData) else TensorData.of(value) for value in inputs]
        except ValueError as error:
            raise InvalidRequest(f"inputs: {error}") from None
        return self.submit(EmbeddingRequest.create(model or self.default_model(), inputs=tensors, **params))

    def submit(self, request: ServingRequest) -> Future:
        """Send a built request of any kind; edge checks raise here, run-time errors fail the future."""
        if self._closed:
            raise RuntimeError("this Client is closed")
        if not isinstance(request, ServingRequest):
            raise InvalidRequest(f"expected a tpm-fed request (generate, trace or embed), got {type(request).__name__}")
        nbytes = check_request_size(request)
        resolved = self.catalog.resolve(request.model)
        request, spec, bound = self._check(request, resolved)
        price = getattr(self.federation.prices, request.kind)
        admission = self.broker.admit(request.request_id, self._placement(request, spec, price, bound))
        self._bookkeeper.admitted(admission, price)
        self._forget_dispatchers([admission.replaced] if admission.replaced else [])
        self._reap_idle()
        dispatcher = self._dispatcher(admission.replica_id, self.federation.site(admission.site), spec)
        # A batch must fit in one task both ways: count what the answer may carry too.
        return dispatcher.submit(request, nbytes + bound.result_bytes)

    def explain(self, request: ServingRequest) -> Decision:
        """What the broker would decide for ``request`` (nothing is reserved or run)."""
        request, spec, bound = self._check(request, self.catalog.resolve(request.model))
        return self.broker.decide(self._placement(request, spec, getattr(self.federation.prices, request.kind), bound))

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
        spec = spec.model_copy(update={"backend": "torch"})  # hooks and adapters need the torch model
        if request.kind == "trace":
            from tpm_fed.protocol.validation import check_trace

            return request, spec, check_trace(request, self.catalog.points(spec), spec.dtype)
        from tpm_fed.adapters.check import pin_adapters

        pinned, bound = pin_adapters(request, self.adapters, self.catalog.hidden_size(spec))
        return pinned, spec, bound

    def _placement(self, request: ServingRequest, spec: ModelSpec, price, bound: UsageBound) -> PlacementRequest:
        location = request.location or self.federation.default_location
        if location not in self.federation.latency_ms and location != self.federation.default_location:
            known = sorted(set(self.federation.latency_ms) | {self.federation.default_location})
            raise InvalidRequest(f"location: unknown location {location!r}; known: {', '.join(known)}")
        return PlacementRequest(
            identity=self.identity,
            project=self.project_for(request.project),
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

    def project_for(self, asked: str | None) -> str:
        """The project this caller charges (``asked``, or their only project)."""
        mine = [p.name for p in self.federation.projects_of(self.identity)]
        if asked is not None:
            if asked not in mine:
                raise NotPermitted(f"{self.identity!r} is not a member of project {asked!r}")
            return asked
        if not mine:
            raise NotPermitted(f"{self.identity!r} is not a member of any project of this federation")
        if len(mine) > 1:
            raise InvalidRequest(f"project: {self.identity!r} is in several projects ({', '.join(mine)}); name one")
        return mine[0]

    def default_model(self) -> ModelRef:
        if not self.federation.models:
            raise UnknownModel(f"the federation in {self.home.federation_file} serves no models")
        return ModelRef(name=self.federation.models[0].name)

    def _dispatcher(self, replica_id: str, site_config: SiteConfig, spec: ModelSpec) -> BatchingDispatcher:
        with self._lock:
            if replica_id not in self._dispatchers:
                self._dispatchers[replica_id] = BatchingDispatcher(
                    self._site(site_config),
                    spec,
                    max_batch=site_config.max_batch_requests,
                    max_in_flight=site_config.capacity.max_replicas,
                    linger_s=site_config.batch_linger_ms / 1000,
                    task_timeout_s=site_config.task_timeout_s,
                    listener=self._bookkeeper,
                    context={
                                                "adapters": str(self.adapters.root),
                        "code_version": serving_code_version(),
                    },
                )
            return self._dispatchers[replica_id]

    def _reap_idle(self) -> None:
        self._forget_dispatchers(self.broker.reap_idle())

    def _forget_dispatchers(self, replica_ids: list[str]) -> None:
        """Stopped replicas get no more work; their worker frees them on its next load."""
        with self._lock:
            for replica_id in replica_ids:
                self._dispatchers.pop(replica_id, None)

    def _site(self, config: SiteConfig) -> Site:
        if config.name not in self._sites:
            self._sites[config.name] = build_site(config, self.home.sites_dir)
        return self._sites[config.name]

    def site(self, name: str | None = None) -> Site:
        """A site of the federation (started on first submit)."""
        config = self.federation.site(name) if name else self.federation.sites[0]
        with self._lock:
            return self._site(config)

    def status(self) -> list[SiteStatus]:
        with self._lock:
            started = dict(self._sites)
        return [
            started[c.name].status() if c.name in started
            else SiteStatus(c.name, c.access, "stopped", c.capacity.max_replicas, 0)
            for c in self.federation.sites
        ]

    def close(self) -> None:
        """Stop every site this client started; their replicas go with them."""
        with self._lock:
            self._closed = True
            sites, self._sites = self._sites, {}
            self._dispatchers.clear()
        for name, site in sites.items():
            site.shutdown()
            self.log.site_stopped(name)
            self.broker.registry.set_state(
                [r.replica_id for r in self.broker.registry.all() if r.site == name and r.live], "stopped"
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
