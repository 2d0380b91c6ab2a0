"""A site of the federation: where replicas run, how it is reached, its capacity and nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from uuid import UUID

from pydantic import AliasChoices, Field, model_validator

from tpm_fed.federation.base import Name, _Strict
from tpm_fed.protocol.errors import TpmError
from tpm_fed.storage.result_stores import check_spec


class Capacity(_Strict):
    """How many replicas a site may hold at once.

    Attributes:
        max_replicas: Replica slots (for a ``local`` site, worker processes).
        accelerators_per_slot: Accelerators each slot has (0 on CPU sites).
    """

    max_replicas: int = Field(default=1, ge=1, le=100_000)
    accelerators_per_slot: int = Field(default=0, ge=0, le=64)


Launcher = Literal["mpiexec", "srun", "aprun", "local-processes"]
"""How one task starts a replica's ranks on the nodes of its block: the cluster's MPI launcher
(``mpiexec`` on PBS, ``srun`` on Slurm, ``aprun`` on Cray ALPS), or ``local-processes``: rank
processes on the worker's own host, where a "node" is a process (this machine, a workstation)."""


class Nodes(_Strict):
    """How many nodes one replica may hold at a site, and how a multi-node replica is started there.

    A replica larger than one node runs as one task holding a whole block of
    nodes (Globus Compute's ``GlobusMPIEngine`` or Parsl's ``MPIExecutor``,
    ``num_nodes``); a task cannot span blocks, so ``max_nodes_per_block`` caps
    the replicas a site can host (:func:`tpm_fed.broker.nodes.node_fit`).

    Attributes:
        max_nodes_per_block: Nodes one task may hold (the endpoint's ``nodes_per_block``).
        accelerators_per_node: Accelerators on each node; unset: ``capacity.accelerators_per_slot``.
        processes_per_node: Ranks a node runs for a model without accelerators (CPU sites):
            there, "accelerators per node" means these. The local site's "nodes" are
            processes on this host: ``{max_nodes_per_block: 2, launcher: local-processes}``
            offers a 2-"node" block of one process each.
        launcher: How the ranks are started (required when a block has more than one node).
        cold_start_s_per_extra_node: Seconds a start takes per node beyond the first (the
            scheduler finding a larger block, every node reading its share of the weights,
            the ranks meeting); added to the site's ``cold_start_s`` for placement.
    """

    max_nodes_per_block: int = Field(default=1, ge=1, le=10_000)
    accelerators_per_node: int | None = Field(default=None, ge=0, le=64)
    processes_per_node: int = Field(default=1, ge=1, le=1024)
    launcher: Launcher | None = None
    cold_start_s_per_extra_node: float = Field(default=0.0, ge=0)


class RegisteredFunction(_Strict):
    """A serving function as Globus Compute knows it (written by ``tpm functions register``).

    Attributes:
        function_id: The id the Globus Compute service gave it.
        code_version: :func:`tpm_fed.code_version.serving_code_version` when it was
            registered; a site refuses to submit it once the code has changed.
    """

    function_id: UUID
    code_version: str = Field(min_length=1)


class WorkerSettings(_Strict):
    """What a ``local`` site's workers permit: its endpoint policy, as an operator would set it.

    The local site passes these to its workers through their ``worker_init``
    (``TPM_ALLOW_CALLER_CODE``, ``TPM_ADAPTER_REGISTRY``), the way a
    ``parsl`` or ``globus-compute`` site's endpoint config does for its own
    (see ``endpoint_configs/``); a task can never change them.

    Attributes:
        allow_caller_code: Callers' own Python (python hooks, input/head code) may run
            there. Unset: only on ``byo`` sites (the broker sends caller code nowhere else).
        adapter_registry: The adapter registry the workers read (relative to the
            federation file). Unset: the federation's ``store/adapters``.
        inline_result_bytes: Results larger than this are left in the site's result
            store (``results``) and come back by reference (``TPM_INLINE_RESULT_BYTES``).
        result_retention_s: How long the result store keeps a result (``TPM_RESULT_RETENTION_S``).
        batch_rows: The most batch-line rows a vLLM replica's engine holds at once, so interactive
            requests share each step with at most this many (``TPM_BATCH_ROWS``). Unset: no cap (right
            on GPUs; on CPUs see docs/performance.md).
        batch_rows_beside_interactive: The most batch-line rows a vLLM replica's engine steps while
            an interactive request is in it; the rest pause until it ends
            (``TPM_BATCH_ROWS_BESIDE_INTERACTIVE``). Unset: 0 on a CPU, no pause on a GPU.
        batch_tokens_after_interactive: The most tokens a vLLM replica's step gives batch lines within a
            second of an interactive request, so the next one waits for a short step
            (``TPM_BATCH_TOKENS_AFTER_INTERACTIVE``). Unset: 16 on a CPU, no limit on a GPU.
        step_tokens: The most tokens one step of a vLLM replica's engine holds, so a burst of prompts is
            prefilled over several short steps (``TPM_STEP_TOKENS``). Unset: 512 on a CPU, vLLM's own
            server's size on a GPU.
    """

    allow_caller_code: bool | None = None
    adapter_registry: Path | None = None
    inline_result_bytes: int | None = Field(default=None, ge=0, le=10 * 1024 * 1024 - 64 * 1024)
    result_retention_s: float | None = Field(default=None, gt=0)
    batch_rows: int | None = Field(default=None, ge=1)
    batch_rows_beside_interactive: int | None = Field(default=None, ge=0)
    batch_tokens_after_interactive: int | None = Field(default=None, ge=1)
    step_tokens: int | None = Field(default=None, ge=1)


class SiteConfig(_Strict):
    """One place where replicas run.

    Attributes:
        name: Unique site name.
        billing: ``rcc`` (a research computing center, paid in service units) or
            ``byo`` (a project's own allocation: free to its members, closed to others).
        owner: The owning project; required for ``byo`` sites.
        access: How to reach it. ``local``: the Globus Compute endpoint engine
            embedded on this machine. ``globus-compute``: a Globus Compute
            endpoint, through the cloud service, by registered function id.
            ``parsl``: the engine an endpoint config describes (its Parsl
            provider and launcher: Slurm, PBS...), run by this process with no
            cloud hop (a broker inside the RCC).
        endpoint_id: The Globus Compute endpoint (``globus-compute`` sites).
        user_endpoint_config: Values for a multi-user endpoint's template
            (account, partition, walltime...); ``globus-compute`` sites.
        resource_specification: Per-task resources passed to the endpoint's engine.
        functions: Registered function ids by name (``globus-compute`` sites).
        engine_config: An endpoint config YAML whose engine this site runs
            (``parsl`` sites; relative to the federation file).
        location: Network location label (a key of the federation's latency table).
        capacity: Replica slots.
        nodes: Nodes per block, accelerators per node and the multi-node launcher (one node
            per replica when unset).
        keep_alive_s: An idle replica is stopped after this long.
        cold_start_s: Expected seconds to start a replica here (for placement).
        max_queue: Requests that may wait for this site before new ones are refused.
        max_batch_requests: Most requests coalesced into one task.
        batch_linger_ms: Quiet time that ends a batch's linger when a worker is free.
        task_timeout_s: A task with no answer after this long fails with a site
            error (long enough for the largest model's cold start here).
        join_for_s: How long after a task began its vLLM replica may take in requests
            that arrive meanwhile (continuous batching; at most a quarter of
            ``task_timeout_s``, so what joins last still has three quarters of it to
            finish; 0 turns it off: they wait for the next task). The default is that
            quarter of the default timeout: a shorter window ends a busy replica's task
            while requests keep coming, and those arriving after it wait for the whole
            task to drain and the next to start (the 16-stream tail of issue 26).
        worker: What the workers permit (``local`` sites; other sites' endpoint configs say).
        results: The site's result store, where its workers leave results too large
            to travel inline and where the service reads them (a ProxyStore connector
            spec: ``file:///path`` or ``redis://host:port``; a plain path is relative
            to the federation file). Local sites: the federation's ``store/results/SITE``
            unless set. Other sites: the store their endpoint config's
            ``TPM_RESULT_STORE`` names, as the service reaches it; unset, only a
            caller who can reach that store reads their results by reference.
    """

    name: str = Name
    billing: Literal["rcc", "byo"] = "rcc"
    owner: str | None = None
    access: Literal["local", "globus-compute", "parsl"] = "local"
    endpoint_id: UUID | None = None
    user_endpoint_config: dict[str, Any] | None = None
    resource_specification: dict[str, Any] | None = None
    functions: dict[str, RegisteredFunction] = Field(default_factory=dict)
    engine_config: Path | None = None
    location: str = "local"
    capacity: Capacity = Capacity()
    nodes: Nodes = Nodes()
    keep_alive_s: float = Field(default=600.0, gt=0)
    cold_start_s: float = Field(default=10.0, ge=0)
    max_queue: int = Field(default=1024, ge=1)
    max_batch_requests: int = Field(default=64, ge=1, le=4096)
    batch_linger_ms: float = Field(default=1.0, ge=0.0, le=1000.0)
    task_timeout_s: float = Field(default=900.0, gt=0)
    # Named admit_for_s until 2026-12: federation files that still say so are read the same.
    join_for_s: float = Field(default=225.0, ge=0.0, validation_alias=AliasChoices("join_for_s", "admit_for_s"))
    worker: WorkerSettings = WorkerSettings()
    results: str | None = Field(default=None, min_length=1, max_length=1024)

    @property
    def accelerators_per_node(self) -> int:
        """Accelerators on each of this site's nodes (``nodes.accelerators_per_node``, else per slot)."""
        given = self.nodes.accelerators_per_node
        return self.capacity.accelerators_per_slot if given is None else given

    @model_validator(mode="after")
    def _nodes_can_be_started(self) -> Self:
        nodes = self.nodes
        if nodes.max_nodes_per_block > 1 and nodes.launcher is None:
            raise ValueError(f"site {self.name!r}: nodes.max_nodes_per_block is {nodes.max_nodes_per_block}, so "
                             "nodes.launcher must say how a task starts ranks on them "
                             "(mpiexec, srun, aprun or local-processes)")
        if self.access == "local" and nodes.launcher not in (None, "local-processes"):
            raise ValueError(f"site {self.name!r}: a local site's nodes are processes on this host; "
                             f"its launcher is local-processes, not {nodes.launcher}")
        slot = self.capacity.accelerators_per_slot
        if nodes.accelerators_per_node is not None and slot and slot != nodes.accelerators_per_node:
            raise ValueError(f"site {self.name!r}: capacity.accelerators_per_slot ({slot}) and "
                             f"nodes.accelerators_per_node ({nodes.accelerators_per_node}) disagree; give one")
        return self

    @property
    def allows_caller_code(self) -> bool:
        """Whether this site's workers run callers' own code (``worker.allow_caller_code``, else byo only)."""
        allowed = self.worker.allow_caller_code
        return self.billing == "byo" if allowed is None else allowed

    def with_adapter_registry_in(self, folder: Path, default: Path) -> Self:
        """A local site with its workers' adapter registry made absolute: its own, or
        ``default``, each relative to ``folder`` (the federation file's)."""
        if self.access != "local":
            return self
        registry = (folder / (self.worker.adapter_registry or default)).resolve()
        return self.model_copy(update={"worker": self.worker.model_copy(update={"adapter_registry": registry})})

    def with_results_in(self, folder: Path, default: Path) -> Self:
        """The site with its result store as a connector spec: a plain path made absolute
        against ``folder`` (the federation file's); a local site's ``default/NAME`` when unset."""
        spec = self.results
        if spec is None and self.access == "local":
            spec = str(default / self.name)
        if spec is None or "://" in spec:
            return self
        return self.model_copy(update={"results": "file://" + str((folder / spec).resolve())})

    @model_validator(mode="after")
    def _results_is_a_store(self) -> Self:
        if self.results is not None and "://" in self.results:
            try:
                check_spec(self.results)
            except TpmError as error:
                raise ValueError(f"site {self.name!r}: {error}") from None
        return self

    @model_validator(mode="after")
    def _worker_settings_are_for_local_sites(self) -> Self:
        if self.access != "local" and self.worker != WorkerSettings():
            raise ValueError(f"site {self.name!r}: worker settings are for local sites; a {self.access} site's "
                             "workers take theirs from its endpoint config's worker_init (TPM_ALLOW_CALLER_CODE...)")
        return self

    @model_validator(mode="after")
    def _owner_matches_billing(self) -> Self:
        if self.billing == "byo" and not self.owner:
            raise ValueError(f"site {self.name!r}: a byo site needs an owner project")
        if self.billing == "rcc" and self.owner:
            raise ValueError(f"site {self.name!r}: only byo sites have an owner")
        return self

    @model_validator(mode="after")
    def _fields_match_access(self) -> Self:
        needs = {"globus-compute": "endpoint_id", "parsl": "engine_config"}
        allowed = {
            "local": set(),
            "globus-compute": {"endpoint_id", "user_endpoint_config", "resource_specification", "functions"},
            "parsl": {"engine_config"},
        }[self.access]
        required = needs.get(self.access)
        if required and getattr(self, required) is None:
            raise ValueError(f"site {self.name!r}: a {self.access} site needs {required}")
        for field in ("endpoint_id", "user_endpoint_config", "resource_specification", "functions",
                      "engine_config"):
            if field not in allowed and getattr(self, field):
                raise ValueError(f"site {self.name!r}: {field} is for other kinds of access, not {self.access}")
        return self
