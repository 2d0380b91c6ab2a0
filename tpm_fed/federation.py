"""The federation file: sites, models, projects, prices and the network between them.

It is operator-owned YAML, validated as a whole when loaded; every mistake is
reported with the field it concerns (unknown keys, negative prices, capacity
0, missing distances, duplicate names, a bring-your-own site without an
owner...). Relative model paths are resolved against the folder holding the
file, so a federation folder can be moved.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import product
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpm_fed.storage.atomic import write_atomically
from tpm_fed.protocol.errors import FederationConfigError, TpmError, UnknownModel
from tpm_fed.protocol.kinds import KINDS, RENAMED_KINDS, KindName
from tpm_fed.protocol.model import BackendChoice, DType
from tpm_fed.protocol.requests import describe_validation_error
from tpm_fed.storage.result_stores import check_spec

Name = Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")

# Request kinds under their names before the rename (a model's ``modes``, the price rows): files written before
# then fail to load, and the message gives the line to write, rather than pydantic's bare "Extra inputs are
# not permitted".
_RENAMES = ", ".join(f"{old} -> {new}" for old, new in RENAMED_KINDS.items())


def _modes_renamed(model: str, modes: Any) -> str:
    """What to write instead of a model's old ``modes`` list."""
    old = modes if isinstance(modes, list) else [modes]
    unknown = [m for m in old if not isinstance(m, str) or m not in RENAMED_KINDS]
    if unknown:
        return (f"model {model!r}: `modes` is now `kinds` ({_RENAMES}); {unknown[0]!r} was never a mode: "
                f"write `kinds:` with some of generate, embed, trace")
    return (f"model {model!r}: `modes` is now `kinds` ({_RENAMES}): "
            f"write `kinds: [{', '.join(RENAMED_KINDS[m] for m in old)}]` instead")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    """

    allow_caller_code: bool | None = None
    adapter_registry: Path | None = None
    inline_result_bytes: int | None = Field(default=None, ge=0, le=10 * 1024 * 1024 - 64 * 1024)
    result_retention_s: float | None = Field(default=None, gt=0)


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
        admit_for_s: How long after a task began its vLLM replica may take in requests
            that arrive meanwhile (continuous admission; at most a quarter of
            ``task_timeout_s``; 0 turns it off: they wait for the next task).
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
    admit_for_s: float = Field(default=30.0, ge=0.0)
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


class ModelConfig(_Strict):
    """One model the federation serves.

    Attributes:
        name: Unique model name users ask for.
        path: Hugging Face model directory (relative to the federation file).
        store: Versions come from the federation's model store instead
            (``tpm models add``); then there is no ``path``.
        backend: ``auto`` (vLLM where installed and the architecture is
            supported, else torch), ``torch`` or ``vllm``.
        dtype: Load dtype.
        tensor_parallel_size: Ranks each layer is split over (GPUs on GPU sites, processes on
            CPU sites); best at most a node's accelerators (vLLM keeps it on one node).
        pipeline_parallel_size: Stages the layers are split into; with more ranks than a node
            has, the replica spans nodes (:func:`tpm_fed.broker.nodes.nodes_needed`).
        accelerators: Accelerators one replica needs, all its nodes together: 0 (runs on CPU)
            or one per rank, ``tensor_parallel_size x pipeline_parallel_size``.
        memory_gb: Memory one replica needs (informational for operators).
        kinds: Request kinds this model serves (``generate``, ``embed``, ``trace``; ``encode`` for an
            encoder model, a sentence-transformers folder).
        sites: Sites that may host it (all, when empty).
    """

    name: str = Name
    path: Path | None = None
    store: bool = False
    backend: BackendChoice = "auto"
    dtype: DType = "float32"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=1024)
    accelerators: int = Field(default=0, ge=0)
    memory_gb: float = Field(default=1.0, gt=0)
    kinds: list[KindName] = Field(default_factory=lambda: ["generate"], min_length=1)
    sites: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _modes_were_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "modes" in data:
            raise ValueError(_modes_renamed(str(data.get("name")), data["modes"]))
        return data

    @property
    def world_size(self) -> int:
        """Ranks one replica runs (tensor parallel x pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _one_accelerator_per_rank(self) -> Self:
        if self.accelerators not in (0, self.world_size):
            raise ValueError(
                f"model {self.name!r}: accelerators is {self.accelerators}, but tensor_parallel_size "
                f"{self.tensor_parallel_size} x pipeline_parallel_size {self.pipeline_parallel_size} makes "
                f"{self.world_size} ranks of one accelerator each: write {self.world_size} (or 0 for CPU)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (not self.store):
            raise ValueError(f"model {self.name!r}: give either a path or store: true")
        return self


class ProjectConfig(_Strict):
    """A group of users spending service units together.

    Attributes:
        name: Unique project name.
        members: Identities (the OS user name in the embedded default).
        allocations: Service units granted per site name.
        globus_group: A Globus Group (its UUID) whose members are members too, on a
            service with Globus Auth identities (the group's own managers then keep the
            list, not the federation file). Ignored with local identities.
    """

    name: str = Name
    members: list[str] = Field(default_factory=list)
    allocations: dict[str, float] = Field(default_factory=dict)
    globus_group: UUID | None = None

    def admits(self, identity: str, groups: Collection[str] = ()) -> bool:
        """Whether ``identity`` is a member: listed, or in this project's group (``groups``: theirs)."""
        return identity in self.members or (self.globus_group is not None and str(self.globus_group) in groups)

    @model_validator(mode="after")
    def _grants_not_negative(self) -> Self:
        for site, amount in self.allocations.items():
            if amount < 0:
                raise ValueError(f"project {self.name!r}: allocation at {site!r} is negative")
        return self


class Price(_Strict):
    """Service units charged for one kind of request.

    Attributes:
        per_cold_start: Per node started: a replica over N nodes pays N starts.
        per_node_hour: Per hour of replica time the request used, on every node the
            replica holds (its share of the task's load and run time when batched).
    """

    per_1k_prompt_tokens: float = Field(default=0.0, ge=0)
    per_1k_completion_tokens: float = Field(default=0.0, ge=0)
    per_mb_activations: float = Field(default=0.0, ge=0)
    per_cold_start: float = Field(default=0.0, ge=0)
    per_node_hour: float = Field(default=0.0, ge=0)


class Prices(_Strict):
    """The price of each request kind (the rows of :data:`tpm_fed.protocol.kinds.KINDS`; a session pays as traces)."""

    generate: Price = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5)
    embed: Price = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5)
    trace: Price = Price(
        per_1k_prompt_tokens=2.0, per_1k_completion_tokens=4.0, per_mb_activations=1.0, per_cold_start=0.5
    )
    # An encoder is small (22 M parameters for MiniLM) and reads each token once: a tenth of generate's prompt price.
    encode: Price = Price(per_1k_prompt_tokens=0.1, per_cold_start=0.1)

    @model_validator(mode="before")
    @classmethod
    def _rows_were_renamed(cls, data: Any) -> Any:
        old = [row for row in RENAMED_KINDS if isinstance(data, dict) and row in data]
        if old:
            raise ValueError("; ".join(f"`{row}` is now `{RENAMED_KINDS[row]}`" for row in old)
                             + ": rename these rows (the prices themselves are unchanged)")
        return data

    def of(self, kind: str) -> Price:
        """The price a request of ``kind`` pays: its family's (a session pays as traces)."""
        return getattr(self, KINDS[kind].family)


class SloTarget(_Strict):
    """What the operator promises for one request kind, over the SLO window."""

    p95_latency_s: float = Field(gt=0)
    availability: float = Field(default=0.99, gt=0, le=1)


class Slos(_Strict):
    """Service level objectives: targets per request kind, judged over a sliding window.

    Attributes:
        window_s: The window the service reports p50/p95 and availability over.
        generate, embed, trace, session, encode: The target for that kind (none: reported, not judged).
    """

    window_s: float = Field(default=3600.0, gt=0, le=30 * 86400)
    generate: SloTarget | None = None
    embed: SloTarget | None = None
    trace: SloTarget | None = None
    session: SloTarget | None = None
    encode: SloTarget | None = None


def _join_surrogates(value: Any) -> Any:
    """Strings as Python means them: PyYAML reads a JSON escape pair (``\\ud83d\\ude00``) as two
    lone surrogates, which no UTF-8 writer can dump again; join each pair into its character.

    Raises:
        UnicodeError: A surrogate with no partner (not text).
    """
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16") if any(
            "\ud800" <= ch <= "\udfff" for ch in value) else value
    if isinstance(value, dict):
        return {_join_surrogates(k): _join_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_surrogates(item) for item in value]
    return value


class Federation(_Strict):
    """Sites, models, projects, prices and network latencies, as the operator wrote them.

    Attributes:
        latency_ms: Network latency between locations (site locations and named
            caller locations), in either direction; a location is 0 from itself.
        default_location: Where callers are when they do not say.
        store: The model store's folder (relative to the federation file).
    """

    name: str = "embedded"
    sites: list[SiteConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)
    projects: list[ProjectConfig] = Field(default_factory=list)
    prices: Prices = Prices()
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    default_location: str = "local"
    store: Path = Path("store")
    slos: Slos = Slos()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for kind, items in (("sites", self.sites), ("models", self.models), ("projects", self.projects)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names: {', '.join(duplicates)}")
        site_names = {s.name for s in self.sites}
        project_names = {p.name for p in self.projects}
        for site in self.sites:
            if site.owner and site.owner not in project_names:
                raise ValueError(f"site {site.name!r}: owner {site.owner!r} is not a project")
        for model in self.models:
            for site in model.sites:
                if site not in site_names:
                    raise ValueError(f"model {model.name!r}: unknown site {site!r}")
        for project in self.projects:
            for site in project.allocations:
                if site not in site_names:
                    raise ValueError(f"project {project.name!r}: allocation at unknown site {site!r}")
        for source, row in self.latency_ms.items():
            for target, value in row.items():
                if value < 0:
                    raise ValueError(f"latency_ms.{source}.{target}: negative latency")
        caller_locations = set(self.latency_ms) | {self.default_location}
        for caller, site in product(sorted(caller_locations), self.sites):
            if self.latency(caller, site.location) is None:
                raise ValueError(
                    f"latency_ms: no distance between {caller!r} and site {site.name!r} "
                    f"(location {site.location!r})"
                )
        return self

    def latency(self, a: str, b: str) -> float | None:
        """Milliseconds between two locations, or ``None`` if the table has no entry."""
        if a == b:
            return 0.0
        forward = self.latency_ms.get(a, {}).get(b)
        return forward if forward is not None else self.latency_ms.get(b, {}).get(a)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read and validate a federation file; model paths become absolute."""
        try:
            raw = _join_surrogates(yaml.safe_load(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FederationConfigError(f"federation file not found: {path}") from None
        except UnicodeError as error:
            raise FederationConfigError(f"{path}: not UTF-8 text: {error}") from None
        except yaml.YAMLError as error:
            raise FederationConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise FederationConfigError(f"{path}: expected a mapping at the top level")
        try:
            federation = cls.model_validate(raw)
        except ValidationError as error:
            raise FederationConfigError(f"{path}: {describe_validation_error(error)}") from None
        return federation.with_paths_relative_to(path.parent)

    def with_paths_relative_to(self, folder: Path) -> Self:
        models = [
            m.model_copy(update={"path": (folder / m.path).resolve()}) if m.path is not None else m
            for m in self.models
        ]
        sites = [
            s.model_copy(update={"engine_config": (folder / s.engine_config).resolve()})
            if s.engine_config is not None else s
            for s in self.sites
        ]
        sites = [s.with_adapter_registry_in(folder, default=self.store / "adapters")
                 .with_results_in(folder, default=self.store / "results") for s in sites]
        return self.model_copy(update={"models": models, "sites": sites, "store": (folder / self.store).resolve()})

    def dump(self, path: Path) -> None:
        """Write atomically: a crash never leaves half a federation file."""
        write_atomically(path, yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False))

    def model(self, name: str) -> ModelConfig:
        """The model ``name``; :class:`UnknownModel`, listing the known ones, if there is none."""
        return _named(self.models, name, "model", UnknownModel, verb="serves")

    def site(self, name: str) -> SiteConfig:
        """The site ``name``; :class:`FederationConfigError`, listing the known ones, if there is none."""
        return _named(self.sites, name, "site", FederationConfigError)

    def project(self, name: str) -> ProjectConfig:
        """The project ``name``; :class:`FederationConfigError`, listing the known ones, if there is none."""
        return _named(self.projects, name, "project", FederationConfigError)

    def projects_of(self, identity: str, groups: Collection[str] = ()) -> list[ProjectConfig]:
        """The projects ``identity`` is a member of (``groups``: the Globus Groups they belong to)."""
        return [p for p in self.projects if p.admits(identity, groups)]

    @property
    def uses_groups(self) -> bool:
        """Whether any project admits members by Globus Group (else nobody needs to ask Groups)."""
        return any(p.globus_group is not None for p in self.projects)


_Entry = TypeVar("_Entry", SiteConfig, ModelConfig, ProjectConfig)


def _named(entries: list[_Entry], name: str, what: str, error: type[TpmError], *, verb: str = "has") -> _Entry:
    """The entry called ``name``, or ``error`` naming every known one."""
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in entries) or "none"
    raise error(f"unknown {what} {name!r}; the federation {verb}: {known}")
