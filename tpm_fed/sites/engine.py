"""Run tasks on a Globus Compute endpoint engine inside this process.

This is what an endpoint does with a task, minus the cloud: the task is
packed as a ``messagepack`` ``Task`` whose buffer holds the function and its
arguments serialized by ``ComputeSerializer``, handed to the engine (Parsl's
HighThroughputExecutor with some provider), executed by ``execute_task`` in a
long-lived worker process, and returned as a packed ``Result``. Our
functions therefore meet the same serializer, engine and worker lifetime
they meet on an RCC. Subclasses say only which engine to build.

Tasks go out serialized by ``ComputeSerializer`` (the function by name, plain
data: as ``JSONData`` where JSON carries it unchanged, :func:`data_buffer`);
results come back as JSON only: the engine is asked for ``JSONData``
results and anything else is refused unread (:mod:`tpm_fed.sites.json_results`),
since the workers are not the service's to trust.
"""

from __future__ import annotations

from tpm_fed.protocol.entrypoints import WorkerFunction

import atexit
import json
import os
import sys
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tpm_fed.federation import SiteConfig
from tpm_fed.protocol.errors import SiteError, TpmError
from tpm_fed.sites.base import SiteStatus
from tpm_fed.sites.task_resources import task_resources
from tpm_fed.sites.json_results import JSON_RESULTS, data_from_result
from tpm_fed.sites.long_lived import keep_out_of_full_collections
from tpm_fed.sites.remote_errors import error_from_traceback


class EngineSite:
    """A worker pool behind a Globus Compute endpoint engine run by this process.

    The engine starts on the first submit and stays up, with its workers and
    their warm replicas, until :meth:`shutdown`.

    Args:
        name: Site name.
        run_dir: Where the engine keeps logs and task folders.
    """

    access = "engine"

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.run_dir = Path(run_dir).resolve()
        self._engine: Any = None
        self._serializer: Any = None
        self._lock = threading.Lock()
        # One submit into the engine at a time: Parsl's executor sends each task on one ZeroMQ socket and counts
        # task ids without a lock, and replicas' dispatchers submit from their own threads, the engine its
        # retries from its result thread (two at once aborted a test run in libzmq). Reentrant: a submission
        # that fails at once ends its future (and may submit again) in this thread.
        self._submitting = threading.RLock()
        self._state = "stopped"
        self._failure = ""
        self._outstanding = 0
        self.site_config: SiteConfig | None = None  # what the federation says of it (its nodes); set by from_config

    @property
    def workers(self) -> int:
        """Worker processes per block (replica slots), as the engine is configured."""
        raise NotImplementedError

    def _make_engine(self) -> Any:
        """The engine to start (not started yet)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the engine if it is not running (safe to call repeatedly)."""
        with self._lock:
            if self._engine is not None:
                return
            if self._state == "failed":
                raise SiteError(f"site {self.name!r} failed to start earlier: {self._failure}")
            self._state = "starting"
            try:
                self._engine, self._serializer = self._start_engine()
            except Exception as error:
                self._state, self._failure = "failed", f"{type(error).__name__}: {error}"
                raise SiteError(f"site {self.name!r} could not start: {self._failure}") from error
            self._state = "running"
            keep_out_of_full_collections()  # the engine's and Parsl's objects live as long as the process
            # A caller that never closes its Client must not leave worker
            # processes (holding whole models) behind when Python exits.
            atexit.register(self.shutdown)

    def _start_engine(self) -> tuple[Any, Any]:
        from globus_compute_sdk.serialize import ComputeSerializer

        # The engine launches its interchange and workers as
        # `globus-compute-endpoint python-exec ...`, found on PATH.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        engine = self._make_engine()
        engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
        executor = getattr(engine, "executor", None)
        if callable(getattr(executor, "submit_payload", None)):  # the engine's own resubmissions take turns too
            executor.submit_payload = _taking_turns(executor.submit_payload, self._submitting)
        return engine, ComputeSerializer()

    def submit(self, function: WorkerFunction, *args: Any, **kwargs: Any) -> Future[Any]:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        self.start()
        serializer = self._serializer
        task_id = uuid.uuid4()
        buffer = serializer.pack_buffers(
            [serializer.serialize(function), data_buffer(serializer, args), data_buffer(serializer, kwargs)]
        )
        packed = messagepack.pack(Task(task_id=task_id, task_buffer=buffer))

        outcome: Future[Any] = Future()
        try:  # a replica over several nodes asks an MPI engine for them: one task, one block
            resources = task_resources(self.site_config, args) if self.site_config is not None else {}
        except TpmError as error:
            outcome.set_exception(error)
            return outcome
        engine_future = GCFuture(task_id)
        engine_future.add_done_callback(lambda done: self._deliver(done, outcome))
        with self._lock:
            self._outstanding += 1
        with self._submitting:
            self._engine.submit(engine_future, packed, resource_specification=resources,
                                result_serializers=[JSON_RESULTS])
        return outcome

    def _deliver(self, done: Future, outcome: Future[Any]) -> None:
        from globus_compute_common import messagepack

        with self._lock:
            self._outstanding -= 1
        try:
            result = messagepack.unpack(done.result())
            if result.is_error:
                outcome.set_exception(error_from_traceback(self.name, result.data))
            else:
                outcome.set_result(data_from_result(self.name, result.data))
        except TpmError as error:  # a worker that sent something other than data
            outcome.set_exception(error)
        except Exception as error:  # the engine itself broke, not the function
            outcome.set_exception(SiteError(f"site {self.name!r}: {type(error).__name__}: {error}"))

    def problem(self) -> str | None:
        """An engine run here is as available as this process: a failed start shows up on submit."""
        return None

    def status(self) -> SiteStatus:
        with self._lock:
            return SiteStatus(
                name=self.name,
                access=self.access,
                state=self._state,  # type: ignore[arg-type]
                workers=self.workers,
                outstanding_tasks=self._outstanding,
                detail=self._failure or str(self.run_dir),
            )

    def shutdown(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
            if self._state != "failed":
                self._state = "stopped"
        if engine is not None:
            atexit.unregister(self.shutdown)
            engine.shutdown()


def _taking_turns(submit: Any, turns: threading.RLock) -> Any:
    def one_at_a_time(*args: Any, **kwargs: Any) -> Any:
        with turns:
            return submit(*args, **kwargs)
    return one_at_a_time


def data_buffer(serializer: Any, data: tuple | dict) -> str:
    """A task's arguments as Globus Compute's ``JSONData`` when JSON carries them unchanged, else its default.

    The default data strategy is dill, whose pickler is pure Python: a task's 64 request dicts took ~8 ms of
    the service's CPU to pickle, ~0.7 ms as JSON (and the worker's ``execute_task`` reads either by its
    header). A value JSON would change (a tuple inside, a non-string key, NaN) keeps the default, so the
    worker's function is called with what it was given.
    """
    from globus_compute_sdk.serialize.concretes import JSONData

    plain = list(data) if isinstance(data, tuple) else data  # a tuple of arguments is unpacked alike as a list
    try:
        payload = JSONData().serialize(plain)
        unchanged = json.loads(payload[len(JSONData.identifier):]) == plain
    except (TypeError, ValueError):  # not JSON-ready (bytes, objects)
        unchanged = False
    return payload if unchanged else serializer.serialize(data)
