"""The Python API: ``Client().generate(...)`` returns a future of the result, served over HTTP.

A client holds no broker and no ledger: it checks a request's fields where
they are built (pydantic, at no cost), sends it to the service
(``POST /tpm/v1/requests``) on a pooled HTTP connection, and the future
resolves with the typed result, or fails with the same typed error the
service raised (``InsufficientBalance``, ``PlacementRefused``...).

Which service: ``Client(url=..., token=...)``, else ``TPM_URL``/``TPM_TOKEN``,
else the home's own service, started in the background on first use. A
service given without a token is called with the login ``tpm login`` stored
for it, if any (refreshed when it expires; :mod:`tpm_fed.service_login`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tpm_fed.connection import ensure_service, from_environment
from tpm_fed.home import TpmHome
from tpm_fed.protocol.errors import InvalidRequest, SiteError

# The contract's models are imported where a method needs them: a warm `tpm submit` imports this
# module, and the table of every kind (results, sessions, points, quotes) is most of its import time.
if TYPE_CHECKING:
    from tpm_fed.protocol.points import PointCatalog
    from tpm_fed.protocol.quotes import Quote
    from tpm_fed.protocol.requests import ModelRef, ServingRequest
    from tpm_fed.protocol.results import EmbeddingResult, GenerationResult, ServedResult, SessionResult, TraceResult
    from tpm_fed.completion_stream import CompletionStream
    from tpm_fed.admin_client import Admin
    from tpm_fed.batches_client import Batches

DEFAULT_CONNECTIONS = 64
"""Requests one client keeps in flight at once (each holds a pooled connection while it waits)."""


class Client:
    """Submit requests to a tpm-fed service.

    Args:
        url: The service, e.g. ``https://tpm.alcf.anl.gov``; ``TPM_URL`` or the home's own by default.
        token: Bearer token (``TPM_TOKEN``; the home's service token for the embedded default).
        home: The tpm home whose service to use (``$TPM_HOME`` or ``~/.tpm``).
        progress: Say so on stderr when a service has to be started.
        connections: Requests in flight at once.

    Example:
        >>> with Client() as client:
        ...     result = client.generate("The telescope", max_new_tokens=16).result()
        ...     print(result.texts[0], result.version, result.charge)
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, home: TpmHome | None = None,
                 progress: bool = False, connections: int = DEFAULT_CONNECTIONS) -> None:
        import httpx

        if url is None:
            address = from_environment() or ensure_service(home or TpmHome.default(), announce=progress)
            url, token = address.url, token or address.token
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        login = None
        if not token:
            from tpm_fed.service_login import stored_login_auth

            login = stored_login_auth(home or TpmHome.default(), self.url)
        self._http = httpx.Client(
            base_url=self.url, headers=headers, auth=login,
            verify=self.url.startswith("https:"),  # plain http needs no CA bundle (loading it costs ~40 ms)
            timeout=httpx.Timeout(10.0, read=None),  # a request may queue for a cold start
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        self._pool = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="tpm-client")
        self._closed = False

    # ----- requests -----------------------------------------------------------
    def generate(self, prompts: str | list[str], model: str | None = None, **params: Any) -> Future[GenerationResult]:
        """Generate text for one prompt or a list of prompts.

        Args:
            prompts: A prompt or a list of prompts, answered together.
            model: ``NAME`` or ``NAME@VERSION``; the federation's first model by default.
            **params: :class:`~tpm_fed.protocol.requests.GenerationRequest` fields.

        Raises:
            InvalidRequest: A parameter is malformed (raised here; the service's refusals fail the future).
        """
        from tpm_fed.protocol.generation import GenerationRequest

        return self.submit(GenerationRequest.create(prompts, model or self.default_model(), **params))

    def stream(self, prompt: str, model: str | None = None, **params: Any) -> CompletionStream:
        """Generate for one prompt, its text arriving piece by piece as the replica makes it.

        Iterate the returned :class:`~tpm_fed.completion_stream.CompletionStream` for the
        text; then its ``usage``, ``finish_reason`` and ``tpm`` (version, charge...) are set.

        Raises:
            InvalidRequest: A parameter is malformed (raised here, before anything is sent).
        """
        from tpm_fed.completion_stream import CompletionStream, completion_body
        from tpm_fed.protocol.generation import GenerationRequest

        request = GenerationRequest.create(prompt, model or self.default_model(), **params)
        return CompletionStream(self._http, completion_body(request), self.url)

    def trace(self, prompts: str | list[str], model: str | None = None, **params: Any) -> Future[TraceResult]:
        """Run prompts while reading and writing activations (mode 3); see :class:`TraceRequest`."""
        from tpm_fed.protocol.requests import TraceRequest

        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.submit(TraceRequest.create(model or self.default_model(), prompts=prompts, **params))

    def session(self, steps: list[Any], model: str | None = None, **params: Any) -> Future[SessionResult]:
        """Run traces in order on one replica, in one placement; a step's ``set``/``add`` may take
        ``value_from`` what earlier steps saved (see :class:`~tpm_fed.protocol.sessions.SessionRequest`)."""
        from tpm_fed.protocol.sessions import SessionRequest

        return self.submit(SessionRequest.create(model or self.default_model(), steps=steps, **params))

    def embed(self, inputs: list[Any], model: str | None = None, **params: Any) -> Future[EmbeddingResult]:
        """Run the caller's data through their adapters and the shared core (mode 2)."""
        from tpm_fed.protocol.requests import EmbeddingRequest
        from tpm_fed.protocol.tensors import TensorData

        try:
            tensors = [value if isinstance(value, TensorData) else TensorData.of(value) for value in inputs]
        except ValueError as error:
            raise InvalidRequest(f"inputs: {error}") from None
        return self.submit(EmbeddingRequest.create(model or self.default_model(), inputs=tensors, **params))

    def submit(self, request: ServingRequest) -> Future[ServedResult]:
        """Send a built request of any kind; the future resolves with its result or its typed error."""
        from tpm_fed.protocol.kinds import KINDS
        from tpm_fed.protocol.requests import ServingRequest

        if self._closed:
            raise RuntimeError("this Client is closed")
        if not isinstance(request, ServingRequest):
            raise InvalidRequest(f"expected a tpm-fed request ({', '.join(KINDS)}), got {type(request).__name__}")
        return self._pool.submit(self._serve, request)

    def _serve(self, request: ServingRequest) -> ServedResult:
        from tpm_fed.protocol.kinds import KINDS

        answer = self._call("POST", "/tpm/v1/requests", json=request.to_wire())
        result = KINDS[request.kind].result.from_wire(answer)
        if getattr(result, "tensors_ref", None) is not None:
            from tpm_fed.references.reader import ServiceReader

            # Read lazily, on first use: from the site's store if this machine reaches it, else through us.
            result._reader = ServiceReader(self._http)
        return result

    # ----- what the service knows ---------------------------------------------
    def explain(self, request: ServingRequest) -> dict[str, Any]:
        """Where the broker would place ``request`` and why (nothing is reserved or run)."""
        return self._call("POST", "/tpm/v1/explain", json=request.to_wire())

    def quote(self, request: ServingRequest) -> Quote:
        """The most ``request`` would be charged and when it would be done (nothing is reserved or run)."""
        from tpm_fed.protocol.quotes import Quote

        return Quote.from_wire(self._call("POST", "/tpm/v1/quotes", json=request.to_wire()))

    def points(self, model: str | None = None) -> PointCatalog:
        """Every hookable point of ``model`` with its shape."""
        from tpm_fed.protocol.points import PointCatalog
        from tpm_fed.protocol.generation import ModelRef

        name = str(ModelRef.parse(model)) if model else str(self.default_model())
        return PointCatalog.model_validate(self._call("GET", f"/tpm/v1/models/{name}/points"))

    def models(self) -> list[dict[str, Any]]:
        """Every model with its versions, kinds and per-site warmth (``GET /v1/models``)."""
        return self._call("GET", "/v1/models")["data"]

    def default_model(self) -> ModelRef:
        from tpm_fed.protocol.generation import ModelRef

        models = self.models()
        if not models:
            raise SiteError(f"the service at {self.url} serves no models")
        return ModelRef(name=models[0]["id"])

    def request(self, request_id: str) -> dict[str, Any]:
        """A request's status, charge and version."""
        return self._call("GET", f"/tpm/v1/requests/{request_id}")

    def usage(self, project: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("project", project), ("since", since)) if v is not None}
        return self._call("GET", "/tpm/v1/usage", params=params)["charges"]

    def allocations(self, project: str | None = None) -> list[dict[str, Any]]:
        params = {"project": project} if project else {}
        return self._call("GET", "/tpm/v1/allocations", params=params)["allocations"]

    def sites(self) -> dict[str, Any]:
        return self._call("GET", "/tpm/v1/sites")

    def slo(self) -> dict[str, Any]:
        """Per request kind: p50/p95 latency and availability over the SLO window, against the targets."""
        return self._call("GET", "/tpm/v1/slo")

    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "/tpm/v1/whoami")

    @property
    def batches(self) -> Batches:
        """Batches in OpenAI's format: upload a JSONL file, run it, read its results (:mod:`tpm_fed.batches_client`)."""
        from tpm_fed.batches_client import Batches

        return Batches(self)

    @property
    def admin(self) -> Admin:
        """The operator routes: projects, sites, models, adapters (``NotPermitted`` unless an operator)."""
        from tpm_fed.admin_client import Admin

        return Admin(self)

    def _call(self, method: str, path: str, **options: Any) -> Any:
        import httpx

        from tpm_fed.service.errors import error_from_body

        try:
            response = self._http.request(method, path, **options)
        except httpx.HTTPError as error:
            raise SiteError(f"the service at {self.url} could not be reached: {error}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text[:2000], "code": f"HTTP{response.status_code}"}}
            raise error_from_body(response.status_code, body)
        return response.json()

    # ----- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Wait for requests in flight, then drop the connections (the service and its replicas stay up)."""
        self._closed = True
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
