"""A site on this machine, run by the real Globus Compute endpoint engine.

This is what an endpoint does with a task, minus the cloud: the task is
packed as a ``messagepack`` ``Task`` whose buffer holds the function and its
arguments serialized by ``ComputeSerializer``, handed to
``GlobusComputeEngine`` (Parsl's HighThroughputExecutor with a
``LocalProvider``), executed by ``execute_task`` in a long-lived worker
process, and returned as a packed ``Result``. Our functions therefore meet
the same serializer, engine and worker lifetime they meet on an RCC.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

from tpm_fed.errors import PayloadTooLarge, RemoteExecutionError, SiteError
from tpm_fed.federation import SiteConfig
from tpm_fed.sites.base import SiteStatus

STRATEGY_PERIOD_S = 0.5
"""How often Parsl's scaling loop runs; its first pass starts the worker block."""


class LocalSite:
    """One machine's worker pool behind the Globus Compute endpoint engine.

    The engine starts on the first submit (about a second, plus the worker
    block), and stays up, with its workers and their warm replicas, until
    :meth:`shutdown`.

    Args:
        name: Site name.
        run_dir: Where the engine keeps logs and task folders.
        workers: Worker processes; each is one replica slot.
    """

    kind = "local"

    def __init__(self, name: str, run_dir: Path, workers: int = 1) -> None:
        self.name = name
        self.run_dir = Path(run_dir).resolve()
        self.workers = workers
        self._engine: Any = None
        self._serializer: Any = None
        self._lock = threading.Lock()
        self._state = "stopped"
        self._failure = ""
        self._outstanding = 0

    @classmethod
    def from_config(cls, config: SiteConfig, run_dir: Path) -> Self:
        return cls(name=config.name, run_dir=run_dir, workers=config.capacity.max_replicas)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": str(self.run_dir), "workers": self.workers}

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
            # A caller that never closes its Client must not leave worker
            # processes (holding whole models) behind when Python exits.
            atexit.register(self.shutdown)

    def _start_engine(self) -> tuple[Any, Any]:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from globus_compute_sdk.serialize import ComputeSerializer
        from parsl.providers import LocalProvider

        # The engine launches its interchange and workers as
        # `globus-compute-endpoint python-exec ...`, found on PATH.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        engine = GlobusComputeEngine(
            label=f"tpm-{self.name}",
            address="127.0.0.1",
            max_workers_per_node=self.workers,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            job_status_kwargs={"strategy_period": STRATEGY_PERIOD_S},
            encrypted=False,  # loopback only; CurveZMQ buys nothing here
        )
        engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
        return engine, ComputeSerializer()

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        self.start()
        serializer = self._serializer
        task_id = uuid.uuid4()
        buffer = serializer.pack_buffers(
            [serializer.serialize(function), serializer.serialize(args), serializer.serialize(kwargs)]
        )
        packed = messagepack.pack(Task(task_id=task_id, task_buffer=buffer))

        outcome: Future[Any] = Future()
        engine_future = GCFuture(task_id)
        engine_future.add_done_callback(lambda done: self._deliver(done, outcome))
        with self._lock:
            self._outstanding += 1
        self._engine.submit(engine_future, packed, resource_specification={})
        return outcome

    def _deliver(self, done: Future, outcome: Future[Any]) -> None:
        from globus_compute_common import messagepack

        with self._lock:
            self._outstanding -= 1
        try:
            result = messagepack.unpack(done.result())
            if result.is_error and "MaxResultSizeExceeded" in result.data:
                outcome.set_exception(PayloadTooLarge(
                    f"site {self.name!r}: the result is over the 10 MB a task may return "
                    f"({_last_line(result.data)}); ask for less per request"
                ))
            elif result.is_error:
                outcome.set_exception(
                    RemoteExecutionError(
                        f"site {self.name!r}: {_last_line(result.data)}",
                        remote_traceback=result.data,
                    )
                )
            else:
                outcome.set_result(self._serializer.deserialize(result.data))
        except Exception as error:  # the engine itself broke, not the function
            outcome.set_exception(SiteError(f"site {self.name!r}: {type(error).__name__}: {error}"))

    def status(self) -> SiteStatus:
        with self._lock:
            return SiteStatus(
                name=self.name,
                kind=self.kind,
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


def _last_line(traceback_text: str) -> str:
    """The exception line of a remote traceback (its last non-decoration line)."""
    lines = [
        line.strip()
        for line in traceback_text.splitlines()
        if line.strip() and not set(line.strip()) <= {"+", "-"}
    ]
    return lines[-1] if lines else "the function raised"
