"""A site on this machine: the endpoint engine with Parsl's ``LocalProvider``.

Its workers get their policy (may callers' code run? where is the adapter
registry?) exactly as a real endpoint's do: from the provider's
``worker_init``, which this site writes from the federation file's
``worker`` settings for the site. The worker reads it from its environment
(``functions/policy.py``); nothing in a task can change it. Every policy
variable is set or unset explicitly, so nothing leaks in from the
environment of the process that starts the site. The workers load models
only from the federation's model folders and store (``TPM_MODEL_ROOTS``):
a task names a model's folder, and anyone who can submit could name any.

The engine's interchange is encrypted (CurveZMQ): a worker pool registers
only with the key pair made for this site at each start, kept in a folder
only the owner can open (:func:`private_certificates`). Without it, any
local user could attach a pool of their own, take other users' requests
and answer them.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.sites.engine import EngineSite

STRATEGY_PERIOD_S = 0.5
"""How often Parsl's scaling loop runs; its first pass starts the worker block."""

HEARTBEAT_PERIOD_S = 1
"""How often a worker pool checks its worker processes (and heartbeats its interchange).
Parsl's default, 30 s, is how long a task stays with a dead worker before it fails
with ``WorkerLost`` and can be tried again elsewhere; on one machine a check a second costs nothing."""

HEARTBEAT_THRESHOLD_S = 30
"""A worker pool silent this long is lost, with its tasks (Parsl's default: 120 s; not less, so a
busy machine that starves the pool for a few seconds does not lose it)."""


class LocalSite(EngineSite):
    """One machine's worker pool behind the Globus Compute endpoint engine.

    The engine starts on the first submit (about a second, plus the worker
    block), as :class:`~tpm_fed.sites.engine.EngineSite` describes.

    Args:
        name: Site name.
        run_dir: Where the engine keeps logs and task folders.
        workers: Worker processes; each is one replica slot.
        allow_caller_code: The workers run callers' own Python (python hooks, input/head code).
        adapter_registry: The adapter registry the workers read (None: no registered adapters).
        result_store: Where the workers leave large results (a connector spec; None: all inline).
        inline_result_bytes: Results over this go to the store (None: the workers' default).
        result_retention_s: How long the store keeps them (None: the workers' default).
        model_roots: The folders the workers may load models from (None: any; a service's
            sites get their federation's, :func:`model_roots_of`).
        batch_rows: The most batch-line rows in a vLLM replica's engine at once (None: no cap).
        batch_rows_beside_interactive: The most it steps while an interactive row is in it (None: the
            engine's default, 0 on a CPU and no pause on a GPU).
        batch_tokens_after_interactive: The most tokens its step gives batch rows within a second of an
            interactive row (None: the engine's default, 16 on a CPU and no limit on a GPU).
        step_tokens: The most tokens one step of its engine holds (None: the engine's default, 512 on a
            CPU and vLLM's own server's size on a GPU).
    """

    access = "local"

    def __init__(self, name: str, run_dir: Path, workers: int = 1, *, allow_caller_code: bool = False,
                 adapter_registry: Path | str | None = None, result_store: str | None = None,
                 inline_result_bytes: int | None = None, result_retention_s: float | None = None,
                 model_roots: Iterable[Path | str] | None = None, batch_rows: int | None = None,
                 batch_rows_beside_interactive: int | None = None,
                 batch_tokens_after_interactive: int | None = None, step_tokens: int | None = None) -> None:
        super().__init__(name, run_dir)
        self._workers = workers
        self.allow_caller_code = allow_caller_code
        self.adapter_registry = Path(adapter_registry).resolve() if adapter_registry is not None else None
        self.result_store = result_store
        self.inline_result_bytes = inline_result_bytes
        self.result_retention_s = result_retention_s
        self.model_roots = None if model_roots is None else [Path(root).resolve() for root in model_roots]
        self.batch_rows = batch_rows
        self.batch_rows_beside_interactive = batch_rows_beside_interactive
        self.batch_tokens_after_interactive = batch_tokens_after_interactive
        self.step_tokens = step_tokens

    @classmethod
    def from_config(cls, config: SiteConfig, run_dir: Path, model_roots: Iterable[Path] | None = None) -> Self:
        return cls(name=config.name, run_dir=run_dir, workers=config.capacity.max_replicas,
                   allow_caller_code=config.allows_caller_code, adapter_registry=config.worker.adapter_registry,
                   result_store=config.results, inline_result_bytes=config.worker.inline_result_bytes,
                   result_retention_s=config.worker.result_retention_s, model_roots=model_roots,
                   batch_rows=config.worker.batch_rows,
                   batch_rows_beside_interactive=config.worker.batch_rows_beside_interactive,
                   batch_tokens_after_interactive=config.worker.batch_tokens_after_interactive,
                   step_tokens=config.worker.step_tokens)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": str(self.run_dir), "workers": self.workers,
                "allow_caller_code": self.allow_caller_code,
                "adapter_registry": str(self.adapter_registry) if self.adapter_registry else None,
                "result_store": self.result_store, "inline_result_bytes": self.inline_result_bytes,
                "result_retention_s": self.result_retention_s, "batch_rows": self.batch_rows,
                "batch_rows_beside_interactive": self.batch_rows_beside_interactive,
                "batch_tokens_after_interactive": self.batch_tokens_after_interactive,
                "step_tokens": self.step_tokens,
                "model_roots": None if self.model_roots is None else [str(root) for root in self.model_roots]}

    @property
    def workers(self) -> int:
        return self._workers

    def worker_init(self) -> str:
        """The shell lines that set the workers' policy, as an endpoint config's ``worker_init`` would."""
        lines = [f"export TPM_ALLOW_CALLER_CODE={int(self.allow_caller_code)}",
                 # The service started these workers on its own host and gives them only its bound URL.
                 "export TPM_STREAM_LOOPBACK=1",
                 "unset TPM_WORKER_POLICY TPM_MAX_RESULT_BYTES TPM_MAX_REFERENCE_BYTES"]
        roots = None if self.model_roots is None else os.pathsep.join(map(str, self.model_roots))
        for variable, value in (("TPM_ADAPTER_REGISTRY", self.adapter_registry),
                                ("TPM_MODEL_ROOTS", roots),
                                ("TPM_RESULT_STORE", self.result_store),
                                ("TPM_INLINE_RESULT_BYTES", self.inline_result_bytes),
                                ("TPM_RESULT_RETENTION_S", self.result_retention_s),
                                ("TPM_BATCH_ROWS", self.batch_rows),
                                ("TPM_BATCH_ROWS_BESIDE_INTERACTIVE", self.batch_rows_beside_interactive),
                                ("TPM_BATCH_TOKENS_AFTER_INTERACTIVE", self.batch_tokens_after_interactive),
                                ("TPM_STEP_TOKENS", self.step_tokens)):
            lines.append(f"unset {variable}" if value is None else f"export {variable}={shlex.quote(str(value))}")
        return "\n".join(lines)

    def _make_engine(self) -> Any:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        engine = GlobusComputeEngine(
            label=f"tpm-{self.name}",
            address="127.0.0.1",
            max_workers_per_node=self.workers,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=self.worker_init()),
            job_status_kwargs={"strategy_period": STRATEGY_PERIOD_S},
            heartbeat_period=HEARTBEAT_PERIOD_S,
            heartbeat_threshold=HEARTBEAT_THRESHOLD_S,
            encrypted=True,  # loopback is open to every local user: only pools holding the site's keys join
        )
        # Set before start, so Parsl uses these (made private) rather than making its own.
        engine.executor.cert_dir = private_certificates(self.run_dir)
        return engine


def private_certificates(parent: Path) -> str:
    """A fresh CurveZMQ key pair for the interchange and its pools, in ``parent/certificates``.

    The folder is made 0700 (Parsl refuses any other mode) and the key files
    0600 (Parsl writes them with the process umask). New keys at every start:
    a pool that held an earlier start's keys cannot join this one.
    """
    from parsl import curvezmq

    folder = parent / "certificates"  # the name Parsl gives it
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # an existing folder keeps its old mode under mkdir
    cert_dir = curvezmq.create_certificates(parent)
    for name in os.listdir(cert_dir):
        os.chmod(os.path.join(cert_dir, name), 0o600)
    return cert_dir


def model_roots_of(federation: Federation, models_dir: Path) -> list[Path]:
    """The folders a service's local sites may load models from.

    The home's models folder (where ``tpm`` puts models), the federation's
    model store, and the folder of every model the federation lists, so a
    model kept elsewhere is still served; a folder inside another is not
    listed twice.
    """
    folders = [models_dir, federation.store, *(model.path for model in federation.models if model.path is not None)]
    resolved = sorted({Path(folder).resolve() for folder in folders}, key=lambda path: (len(path.parts), path))
    roots: list[Path] = []
    for folder in resolved:
        if not any(folder.is_relative_to(root) for root in roots):
            roots.append(folder)
    return roots
