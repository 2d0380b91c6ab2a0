"""A site behind a Globus Compute endpoint, reached through the cloud service.

Tasks go out through the SDK's own ``globus_compute_sdk.Executor``, by
registered function id (``submit_to_registered_function``), with the site's
``user_endpoint_config`` (a multi-user endpoint renders its template from
it: account, partition, walltime...) and ``resource_specification``. The SDK
batches submissions over HTTPS and receives results over AMQP; this class
turns what comes back into our types:

- a function that raised at the endpoint: :class:`RemoteExecutionError` with
  the remote traceback (or :class:`PayloadTooLarge` for an oversized result);
- the service refusing the call: :class:`NotLoggedIn` (401),
  :class:`FunctionNotRegistered` (the endpoint does not allow the function, or
  the service does not know it), :class:`PayloadTooLarge` (413), or
  :class:`SiteError` naming the endpoint;
- an endpoint that is not connected: :class:`EndpointOffline`, found by
  :meth:`GlobusComputeSite.problem` before a request is placed here, so the
  broker sends it elsewhere;
- a result that is not JSON data: :class:`ResultNotData`. The executor asks
  the endpoint for ``JSONData`` results, and its client reads results only
  as JSON (:mod:`tpm_fed.sites.json_results`): a byo endpoint is run by its
  owner, and a pickled result would run the owner's code in the service.
"""

from __future__ import annotations

from tpm_fed.protocol.entrypoints import WorkerFunction

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, Self
from uuid import UUID

from tpm_fed.protocol.errors import (
    EndpointOffline,
    FunctionNotRegistered,
    NotLoggedIn,
    PayloadTooLarge,
    ResultNotData,
    SiteError,
    TpmError,
)
from tpm_fed.federation import SiteConfig
from tpm_fed.globus_auth import LOGIN_HINT, compute_client
from tpm_fed.sites.base import SiteStatus
from tpm_fed.sites.json_results import JSON_RESULTS, json_results_serializer
from tpm_fed.sites.registration import registered_id
from tpm_fed.sites.remote_errors import error_from_traceback
from tpm_fed.sites.task_resources import task_resources

STATUS_TTL_S = 15.0
"""How long an endpoint's online/offline answer is trusted before asking the service again."""


class GlobusComputeSite:
    """Runs our registered functions on a Globus Compute endpoint.

    Nothing touches the network until the first :meth:`submit` or :meth:`problem`.

    Args:
        config: The site's federation entry (``access: globus-compute``): endpoint id,
            registered function ids, ``user_endpoint_config``, ``resource_specification``.
        client_factory: Makes the logged-in ``globus_compute_sdk.Client``
            (:func:`tpm_fed.globus_auth.compute_client` by default).
    """

    access = "globus-compute"

    def __init__(self, config: SiteConfig, client_factory: Callable[[], Any] = compute_client) -> None:
        if config.access != "globus-compute" or config.endpoint_id is None:
            raise ValueError(f"site {config.name!r} is not a globus-compute site")
        self.name = config.name
        self.site_config = config
        self.endpoint_id: UUID = config.endpoint_id
        self._client_factory = client_factory
        self._client: Any = None
        self._executor: Any = None
        self._lock = threading.Lock()
        self._outstanding = 0
        self._endpoint_state: tuple[float, str, str] | None = None  # (checked at, status, detail)

    @classmethod
    def from_config(cls, config: SiteConfig) -> Self:
        return cls(config)

    def config(self) -> dict[str, Any]:
        return self.site_config.model_dump(mode="json", exclude_defaults=True)

    def _client_now(self) -> Any:
        """Called under the lock."""
        if self._client is None:
            client = self._client_factory()
            try:
                client.version_check()
            except Exception as error:
                raise _service_error(self.name, self.endpoint_id, error) from None
            self._client = client
        return self._client

    def _executor_now(self) -> Any:
        """Called under the lock: the SDK executor, new if the last one stopped on an error."""
        from globus_compute_sdk import Executor

        if self._executor is None or self._executor._stopped:
            task_group = None if self._executor is None else self._executor.task_group_id
            self._executor = Executor(
                endpoint_id=self.endpoint_id,
                client=self._client_now(),
                user_endpoint_config=self.site_config.user_endpoint_config,
                resource_specification=self.site_config.resource_specification,
                label=f"tpm-{self.name}",
                serializer=json_results_serializer(self.name),  # becomes the client's: results read as JSON only
                result_serializers=[JSON_RESULTS],
            )
            # The SDK gives a new Executor the last task group any Executor in the process used
            # (a class-wide default), so every site and every caller would share one task group
            # and one result watcher: a caller's tasks would join another identity's group, and a
            # watcher bound to a stopped executor's client would hold every later result. Each
            # site (one identity) keeps its own group, named by the web service on the first
            # submission and kept when the executor is replaced, so its result watcher (one
            # AMQP connection) is reused rather than left behind.
            self._executor.task_group_id = task_group
        return self._executor

    def submit(self, function: WorkerFunction, *args: Any, **kwargs: Any) -> Future[Any]:
        function_id = registered_id(self.site_config, function)
        resources = task_resources(self.site_config, args)  # a replica over several nodes asks for them
        with self._lock:
            executor = self._executor_now()
            # The SDK sends the executor's specification with each batch it submits; set it for this task
            # (under the lock: one submission at a time), and back to the site's own for the next.
            if executor.resource_specification != (resources or None):
                executor.resource_specification = resources or None
            sdk_future = executor.submit_to_registered_function(function_id, args=args, kwargs=kwargs)
            self._outstanding += 1
        outcome: Future[Any] = Future()
        sdk_future.add_done_callback(lambda done: self._deliver(done, outcome))
        return outcome

    def _deliver(self, done: Future, outcome: Future[Any]) -> None:
        from globus_compute_sdk.errors import TaskExecutionFailed

        with self._lock:
            self._outstanding -= 1
        try:
            outcome.set_result(done.result())
        except ResultNotData as error:
            outcome.set_exception(error)
        except TaskExecutionFailed as error:
            outcome.set_exception(error_from_traceback(self.name, error.remote_data))
        except CancelledError:
            outcome.set_exception(SiteError(
                f"site {self.name!r}: the Globus Compute executor for endpoint {self.endpoint_id} "
                "stopped before the task was sent"
            ))
        except Exception as error:
            refused = _result_not_data(error)  # the SDK wraps what its serializer raised
            outcome.set_exception(refused or _service_error(self.name, self.endpoint_id, error))

    def problem(self) -> str | None:
        """Why the broker should not place work here now (``None``: go ahead).

        Asks the service for the endpoint's status at most every :data:`STATUS_TTL_S`.

        Raises:
            NotLoggedIn: This machine has no Globus Compute credentials.
        """
        status, detail = self._endpoint_status()
        if status == "online":
            return None
        return f"endpoint {self.endpoint_id} is {status}" + (f" ({detail})" if detail else "")

    def _endpoint_status(self) -> tuple[str, str]:
        cached = self._endpoint_state
        if cached is not None and time.monotonic() - cached[0] < STATUS_TTL_S:
            return cached[1], cached[2]
        try:
            with self._lock:
                client = self._client_now()
            reply = client.get_endpoint_status(str(self.endpoint_id))
            status, detail = str(reply.get("status", "unknown")), ""
        except Exception as error:
            failure = _service_error(self.name, self.endpoint_id, error)
            if isinstance(failure, NotLoggedIn):
                raise failure from None
            status, detail = "unreachable", str(failure)
        self._endpoint_state = (time.monotonic(), status, detail)
        return status, detail

    def status(self) -> SiteStatus:
        cached = self._endpoint_state
        if cached is None:
            state, detail = "stopped", f"endpoint {self.endpoint_id} (not asked yet)"
        else:
            state = "running" if cached[1] == "online" else "offline"
            detail = f"endpoint {self.endpoint_id} {cached[1]}" + (f": {cached[2]}" if cached[2] else "")
        return SiteStatus(
            name=self.name,
            access=self.access,
            state=state,  # type: ignore[arg-type]
            workers=self.site_config.capacity.max_replicas,
            outstanding_tasks=self._outstanding,
            detail=detail,
        )

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _result_not_data(error: BaseException | None) -> ResultNotData | None:
    """The :class:`ResultNotData` behind an SDK error, if the result was refused for not being data."""
    while error is not None:
        if isinstance(error, ResultNotData):
            return error
        error = error.__cause__ or error.__context__
    return None


def _service_error(site: str, endpoint_id: UUID, error: BaseException) -> TpmError:
    """Our error for what the Globus Compute service (or the way to it) answered."""
    import globus_sdk

    if isinstance(error, TpmError):
        return error
    where = f"site {site!r} (endpoint {endpoint_id})"
    if isinstance(error, globus_sdk.GlobusAPIError):
        message = f"{where}: Globus Compute answered {error.http_status} {error.code}: {error.message}"
        if error.http_status == 401:
            return NotLoggedIn(f"{where}: the service refused our credentials; {LOGIN_HINT}")
        if error.http_status == 413:
            return PayloadTooLarge(f"{message} (split the request)")
        if error.code == "FUNCTION_NOT_PERMITTED" or (
            error.http_status in (403, 404) and "function" in str(error.message).lower()
        ):
            return FunctionNotRegistered(
                f"{message}; run `tpm functions register --site {site}` and make sure the "
                "endpoint's allowed_functions lists the new id"
            )
        if error.http_status == 404:
            return EndpointOffline(f"{where}: Globus Compute does not know this endpoint ({error.message})")
        return SiteError(message)
    if isinstance(error, globus_sdk.GlobusConnectionError):
        return SiteError(f"{where}: cannot reach Globus Compute: {error}")
    return SiteError(f"{where}: {type(error).__name__}: {error}")
