"""The Python API: ``Client().generate(...)`` returns a future of the result.

A client reads the federation, checks each request at the edge, pins it to
an exact model version, hands it to the dispatcher for that site and model
version, and records it in the request log. Sites start on first use and stop
when the client closes (it is a context manager).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from tpm_fed.catalog import ModelCatalog
from tpm_fed.dispatch import BatchingDispatcher
from tpm_fed.errors import UnknownModel
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.models.spec import ModelSpec
from tpm_fed.home import TpmHome
from tpm_fed.request import GenerationRequest, ModelRef
from tpm_fed.result import GenerationResult
from tpm_fed.sites import Site, SiteStatus, build_site
from tpm_fed.state import RequestLog


class Client:
    """Submit requests to a federation.

    Args:
        home: The tpm home folder; ``$TPM_HOME`` or ``~/.tpm`` by default.
        create_default: Create the embedded default federation in ``home``
            (federation file and demo model) if it has none.
        progress: Show progress bars while the default is being made.

    Example:
        >>> with Client() as client:
        ...     result = client.generate("The telescope", max_new_tokens=16).result()
        ...     print(result.texts[0], result.version)
    """

    def __init__(self, home: TpmHome | None = None, *, create_default: bool = True, progress: bool = False) -> None:
        self.home = home or TpmHome.default()
        if create_default:
            self.home.ensure_embedded_default(progress=progress)
        self.federation = Federation.load(self.home.federation_file)
        self.catalog = ModelCatalog(self.federation)
        self.log = RequestLog(self.home.database_url)
        self._sites: dict[str, Site] = {}
        self._dispatchers: dict[tuple[str, str, str], BatchingDispatcher] = {}
        self._lock = threading.Lock()
        self._closed = False

    def generate(self, prompts: str | list[str], model: str | None = None, **params: Any) -> Future[GenerationResult]:
        """Generate text for one prompt or a list of prompts.

        Args:
            prompts: A prompt or a list of prompts, answered together.
            model: ``NAME`` or ``NAME@VERSION``; the federation's first model by default.
            **params: :class:`~tpm_fed.request.GenerationRequest` fields
                (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``).

        Raises:
            InvalidRequest: A parameter is malformed (raised here, not in the future).
            UnknownModel, UnknownVersion, ModelLoadError: The model cannot be served.
        """
        request = GenerationRequest.create(prompts, model or self.default_model(), **params)
        return self.submit(request)

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Send a built request; edge checks raise here, run-time errors fail the future."""
        if self._closed:
            raise RuntimeError("this Client is closed")
        resolved = self.catalog.resolve(request.model)
        self.catalog.check(request, resolved)
        spec = resolved.spec
        if request.backend is not None and request.backend != spec.backend:
            spec = spec.model_copy(update={"backend": request.backend})
        site_config = self._place(request)
        return self._dispatcher(site_config, spec).submit(request)

    def default_model(self) -> ModelRef:
        if not self.federation.models:
            raise UnknownModel(f"the federation in {self.home.federation_file} serves no models")
        return ModelRef(name=self.federation.models[0].name)

    def _place(self, request: GenerationRequest) -> SiteConfig:
        # One site serves the embedded default; the broker (placement by
        # locality, allocation and load) takes this decision in a federation.
        return self.federation.sites[0]

    def _dispatcher(self, site_config: SiteConfig, spec: ModelSpec) -> BatchingDispatcher:
        key = (site_config.name, *spec.key)
        with self._lock:
            if key not in self._dispatchers:
                self._dispatchers[key] = BatchingDispatcher(
                    self._site(site_config),
                    spec,
                    max_batch=site_config.max_batch_requests,
                    max_in_flight=site_config.workers,
                    linger_s=site_config.batch_linger_ms / 1000,
                    listener=self.log,
                )
            return self._dispatchers[key]

    def _site(self, config: SiteConfig) -> Site:
        if config.name not in self._sites:
            self._sites[config.name] = build_site(config, self.home.sites_dir)
        return self._sites[config.name]

    def site(self, name: str | None = None) -> Site:
        """A site of the federation (started on first submit)."""
        config = next((s for s in self.federation.sites if s.name == name), self.federation.sites[0])
        with self._lock:
            return self._site(config)

    def status(self) -> list[SiteStatus]:
        with self._lock:
            started = dict(self._sites)
        return [
            started[c.name].status() if c.name in started else SiteStatus(c.name, c.kind, "stopped", c.workers, 0)
            for c in self.federation.sites
        ]

    def close(self) -> None:
        """Stop every site this client started; their replicas go with them."""
        with self._lock:
            self._closed = True
            sites, self._sites = self._sites, {}
        for name, site in sites.items():
            site.shutdown()
            self.log.site_stopped(name)
        self.log.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
