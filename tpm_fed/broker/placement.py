"""Placement: which replica takes a request, and why.

A pure function of the federation and a snapshot of replicas, balances and
site health, so it is fast, deterministic and testable without any site.

For a request (caller, project, model@version, kind, location):

1. A site is **eligible** when it is healthy, may host the model (listed,
   and a block of as many nodes as the model's TP x PP ranks need there:
   :mod:`tpm_fed.broker.nodes`), and the project may spend there: it owns
   the site (``byo``, free) or its allocation covers the estimate (``rcc``).
   Another project's ``byo`` site is never eligible. A site too small for
   the model is listed with why ("needs 2 nodes of 4 GPUs; site X gives
   blocks of 1 node").
2. **Candidates** are the live replicas of that model version on eligible
   sites, plus a new replica on each eligible site with a free slot, or
   whose least recently used idle replica (another model's) can give way.
3. Each candidate's score is its expected completion time in seconds:
   ``(queue depth + 1) x recent service time + network latency from the
   caller's location + cold-start time if it must start`` (a start over N
   nodes takes the site's ``cold_start_s`` plus ``cold_start_s_per_extra_node``
   for each node past the first). The lowest score wins; ties go to the
   cheaper (own site first), then by name. A candidate's cost counts every
   node the replica holds: a cold start per node, and node time at the
   kind's ``per_node_hour`` for the site's task timeout on each node.
4. A replica whose queue is full is out; if nothing is left the request is
   refused, with every candidate's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tpm_fed.broker.nodes import node_fit
from tpm_fed.federation import Federation, SiteConfig
from tpm_fed.ledger.pricing import node_time_bound_usu
from tpm_fed.protocol.kinds import KINDS

USER_CODE_EXCLUSION = "shared site: runs no caller Python code"

DEFAULT_SERVICE_S = 1.0
"""Assumed service time of a replica that has not served anything yet."""


@dataclass(frozen=True)
class PlacementRequest:
    """What placement needs to know about a request.

    Attributes:
        estimate_usu: Upper bound of the cost on a warm replica.
        cold_start_usu: Added to the estimate when a replica must start.
        site: A site the caller named explicitly (placement is then limited to it).
        own_site_only: The request runs the caller's own Python code, which only a
            site the caller's project owns (``byo``) may run.
    """

    identity: str
    project: str
    model: str
    version: str
    kind: str
    location: str
    estimate_usu: int
    cold_start_usu: int = 0
    site: str | None = None
    backend: str = "auto"
    own_site_only: bool = False


@dataclass
class ReplicaView:
    """The broker's view of one replica (one model version on one site)."""

    replica_id: str
    site: str
    model: str
    version: str
    state: str  # starting | warm | draining | stopped
    queue_depth: int = 0
    service_s: float = DEFAULT_SERVICE_S
    last_used: float = 0.0
    backend: str = "auto"

    @property
    def live(self) -> bool:
        return self.state in ("starting", "warm")


@dataclass(slots=True)  # built by the thousand per second: slots, not frozen
class Candidate:
    """One option considered, with its score terms, or why it was out."""

    site: str
    replica_id: str | None  # None: start a new replica there
    score_s: float = float("inf")
    queue_s: float = 0.0
    network_s: float = 0.0
    cold_s: float = 0.0
    cost_usu: int = 0
    free: bool = False
    excluded: str | None = None
    replaces: str | None = None  # an idle replica stopped to make room
    nodes: int = 1  # nodes the replica holds (all charged)

    def describe(self) -> str:
        what = f"replica {self.replica_id}" if self.replica_id else "new replica"
        if self.nodes > 1:
            what += f" on {self.nodes} nodes"
        if self.replaces:
            what += f" (replacing idle {self.replaces})"
        if self.excluded:
            return f"{self.site}: {what}: out: {self.excluded}"
        cost = "free (own site)" if self.free else f"up to {self.cost_usu / 1e6:.6f} SU"
        return (
            f"{self.site}: {what}: {self.score_s:.3f} s = queue {self.queue_s:.3f} + "
            f"network {self.network_s:.3f} + cold start {self.cold_s:.3f}; {cost}"
        )


@dataclass(frozen=True)
class Decision:
    chosen: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    refusal: str | None = None

    @property
    def ranked(self) -> list[Candidate]:
        """Eligible candidates, best first."""
        return sorted((c for c in self.candidates if c.excluded is None), key=_rank)

    def explain(self) -> str:
        lines = [c.describe() for c in self.ranked] + [c.describe() for c in self.candidates if c.excluded]
        head = (
            f"placed on {self.chosen.site} ({'existing' if self.chosen.replica_id else 'new'} replica): "
            "lowest expected completion time"
            if self.chosen
            else f"refused: {self.refusal}"
        )
        return "\n".join([head, *("  " + line for line in lines)])


def _rank(candidate: Candidate) -> tuple:
    return (candidate.score_s, not candidate.free, candidate.cost_usu, candidate.site, candidate.replica_id or "")


TOO_SMALL = "needs "
"""How the reason a site cannot give a model's nodes begins (:func:`tpm_fed.broker.nodes.node_fit`)."""

NO_BALANCE = "insufficient balance"
"""How a refusal for lack of service units begins (the broker raises InsufficientBalance for it)."""


class Placer:
    """Indexes a federation once; places many requests against snapshots."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.sites: dict[str, SiteConfig] = {s.name: s for s in federation.sites}
        self._hosts: dict[str, list[SiteConfig]] = {}
        # Only what differs from one node per replica is kept, so a federation of one-node models
        # (the usual case, thousands of sites) places as fast as before multi-node replicas.
        self._multi: dict[str, dict[str, int]] = {}  # model -> {site: nodes a replica holds there, when > 1}
        self._too_small: dict[str, list[tuple[SiteConfig, str]]] = {}  # model -> sites that cannot, and why
        for model in federation.models:
            allowed = set(model.sites) or set(self.sites)
            sites = [s for s in federation.sites if s.name in allowed]
            self._too_small[model.name] = []
            if model.world_size == 1 and model.accelerators == 0:  # one CPU rank: any site, one node
                self._hosts[model.name] = sites
                continue
            self._hosts[model.name] = []
            for s in sites:
                fit = node_fit(model, s)
                if fit.nodes > 1:
                    self._multi.setdefault(model.name, {})[s.name] = fit.nodes
                if fit.refusal is None:
                    self._hosts[model.name].append(s)
                else:
                    self._too_small[model.name].append((s, fit.refusal))
        self._node_hour = {kind: federation.prices.of(kind).per_node_hour for kind in KINDS}
        self._node_time: dict[tuple[str, int, float], int] = {}
        self._too_small_at = {model: {s.name: (s, why) for s, why in small} for model, small in self._too_small.items()}
        self._host_names = {model: {s.name for s in sites} for model, sites in self._hosts.items()}
        self._kinds = {model.name: set(model.kinds) for model in federation.models}
        # Sites each project may spend at (granted, or its own): with a thousand
        # sites, placement looks at these and summarizes the rest.
        self._usable: dict[str, list[SiteConfig]] = {
            p.name: [s for s in federation.sites if s.name in p.allocations or s.owner == p.name]
            for p in federation.projects
        }
        self._latency: dict[tuple[str, str], float] = {}

    def hosts(self, model: str) -> list[SiteConfig]:
        return self._hosts.get(model, [])

    def nodes(self, model: str, site: str) -> int:
        """Nodes one replica of ``model`` holds at ``site`` (1 for a model the federation does not list)."""
        multi = self._multi.get(model)
        return multi.get(site, 1) if multi else 1

    def too_small(self, model: str) -> dict[str, str]:
        """The sites that may list ``model`` but cannot give it its nodes, with why."""
        return {site.name: why for site, why in self._too_small.get(model, [])}

    def node_time_usu(self, request: PlacementRequest, site: SiteConfig) -> int:
        """The most node time ``request`` can be charged at ``site``: all the replica's nodes, the task timeout."""
        if not self._node_hour[request.kind]:
            return 0
        key = (request.kind, self.nodes(request.model, site.name), site.task_timeout_s)
        bound = self._node_time.get(key)
        if bound is None:  # a handful of distinct values: priced once each
            bound = self._node_time[key] = node_time_bound_usu(self.federation.prices.of(request.kind), *key[1:])
        return bound

    def warm_usu(self, request: PlacementRequest, site: SiteConfig) -> int:
        """The most ``request`` costs at ``site`` on a replica that is up."""
        return request.estimate_usu + self.node_time_usu(request, site)

    def cold_usu(self, request: PlacementRequest, site: SiteConfig) -> int:
        """The most ``request`` costs at ``site`` when it starts a replica: every node starts."""
        return self.warm_usu(request, site) + request.cold_start_usu * self.nodes(request.model, site.name)

    def cold_start_s(self, model: str, site: SiteConfig) -> float:
        """Expected seconds to start a replica of ``model`` at ``site``, more for each extra node."""
        return site.cold_start_s + (self.nodes(model, site.name) - 1) * site.nodes.cold_start_s_per_extra_node

    def latency_s(self, location: str, site: SiteConfig) -> float:
        key = (location, site.location)
        if key not in self._latency:
            self._latency[key] = (self.federation.latency(location, site.location) or 0.0) / 1000
        return self._latency[key]

    def place(
        self,
        request: PlacementRequest,
        replicas: Iterable[ReplicaView],
        live_per_site: Mapping[str, int],
        evictable: Callable[[str], ReplicaView | None],
        available_usu: Callable[[str, str], int | None],
        site_problem: Callable[[str], str | None],
    ) -> Decision:
        """Choose a replica for ``request``.

        Args:
            replicas: Live replicas of ``request.model@request.version`` (others are skipped).
            live_per_site: Live replicas of any model, per site (capacity).
            evictable: A site's least recently used idle replica, if any (asked only of full sites).
            available_usu: SUs the project may still spend at a site (None: no allocation there).
            site_problem: Why a site may not take work now (``None``: it may).
        """
        if KINDS[request.kind].family not in self._kinds.get(request.model, {KINDS[request.kind].family}):
            served = ", ".join(sorted(self._kinds[request.model]))
            return Decision(None, [], refusal=f"model {request.model!r} does not serve {request.kind!r} "
                                              f"requests (it serves: {served})")
        hosts = self.hosts(request.model)
        candidates: list[Candidate] = []
        too_small = self._too_small.get(request.model, [])
        multi = self._multi.get(request.model)  # None: one node everywhere
        simple = multi is None and not self._node_hour[request.kind]  # costs as before multi-node replicas
        if request.site is not None:
            hosts = [s for s in hosts if s.name == request.site]
            too_small = [(s, why) for s, why in too_small if s.name == request.site]
        elif request.project in self._usable:
            # Hosts this project has no claim on are out for one reason: say it once.
            host_names = self._host_names.get(request.model, set())
            usable = [s for s in self._usable[request.project] if s.name in host_names]
            others = len(hosts) - len(usable)
            if others:
                candidates.append(Candidate(
                    f"{others} other site(s)", None,
                    excluded=f"project {request.project!r} has no allocation there (or they are byo sites of others)",
                ))
            hosts = usable
            if too_small:  # the project's few sites, looked up among the model's too-small ones
                at = self._too_small_at[request.model]
                too_small = [at[s.name] for s in self._usable[request.project] if s.name in at]
        # Sites the project could use but that cannot give the model's nodes: say why, each.
        candidates.extend(Candidate(s.name, None, excluded=why, nodes=self.nodes(request.model, s.name))
                          for s, why in too_small)
        eligible: dict[str, tuple[bool, SiteConfig]] = {}
        for site in hosts:
            reason, free = self._site_exclusion(request, site, available_usu, site_problem, simple)
            if reason:
                candidates.append(Candidate(site.name, None, excluded=reason))
            else:
                eligible[site.name] = (free, site)

        for replica in replicas:
            if replica.site not in eligible or not replica.live or replica.backend != request.backend:
                continue
            free, site = eligible[replica.site]
            queue_s = replica.queue_depth * replica.service_s
            network_s = self.latency_s(request.location, site)
            if replica.queue_depth >= site.max_queue:
                candidates.append(Candidate(site.name, replica.replica_id, excluded=f"queue full ({replica.queue_depth})"))
                continue
            candidates.append(Candidate(
                site.name, replica.replica_id, score_s=queue_s + replica.service_s + network_s,
                queue_s=queue_s, network_s=network_s,
                cost_usu=0 if free else request.estimate_usu if simple else self.warm_usu(request, site),
                free=free, nodes=multi.get(site.name, 1) if multi else 1,
            ))
        for name, (free, site) in eligible.items():
            replaces = None
            if live_per_site.get(name, 0) >= site.capacity.max_replicas:
                victim = evictable(name)
                if victim is None:
                    candidates.append(Candidate(
                        name, None, excluded=f"at capacity ({site.capacity.max_replicas} replicas, all busy)"))
                    continue
                replaces = victim.replica_id
            network_s = self.latency_s(request.location, site)
            cold_s = site.cold_start_s if multi is None else self.cold_start_s(request.model, site)
            cost = (0 if free else request.estimate_usu + request.cold_start_usu if simple
                    else self.cold_usu(request, site))
            candidates.append(Candidate(
                name, None, score_s=cold_s + DEFAULT_SERVICE_S + network_s, network_s=network_s,
                cold_s=cold_s, cost_usu=cost, free=free, replaces=replaces,
                nodes=multi.get(name, 1) if multi else 1,
            ))

        usable = [c for c in candidates if c.excluded is None]
        if not usable:
            return Decision(None, candidates, refusal=self._refusal(request, hosts, candidates))
        return Decision(min(usable, key=_rank), candidates)

    def _site_exclusion(self, request, site, available_usu, site_problem, simple) -> tuple[str | None, bool]:
        problem = site_problem(site.name)
        if problem is not None:
            return f"unhealthy: {problem}", False
        if site.billing == "byo":
            if site.owner == request.project:
                return None, True
            return f"byo site of project {site.owner!r}", False
        if request.own_site_only:
            return USER_CODE_EXCLUSION, False
        available = available_usu(request.project, site.name)
        if available is None:
            return f"project {request.project!r} has no allocation here", False
        needed = request.estimate_usu if simple else self.warm_usu(request, site)
        if available < needed:
            return f"balance {available / 1e6:.6f} SU < estimate {needed / 1e6:.6f} SU", False
        return None, False

    def _refusal(self, request: PlacementRequest, hosts: list[SiteConfig], candidates: list[Candidate]) -> str:
        if not self.hosts(request.model) or (request.site and not hosts):
            where = f"site {request.site!r}" if request.site else "any site"
            why = self._too_small.get(request.model, [])
            if request.site:
                why = [(s, reason) for s, reason in why if s.name == request.site]
            because = f": {why[0][1]}" if len(why) == 1 else (
                f": {len(why)} sites too small (each listed below)" if why else "")
            return f"model {request.model!r} cannot be hosted on {where}{because}"
        reasons = {c.excluded for c in candidates}
        if request.own_site_only and all(r in (USER_CODE_EXCLUSION, None) or r.startswith("byo site") for r in reasons):
            return (f"the request carries Python code (python_hooks, input_code or head_code), which runs only on "
                    f"a site project {request.project!r} owns; none that serves {request.model!r} is available. "
                    "Use the declarative spec and registered adapters on shared sites")
        small = sorted(r for r in reasons if r and r.startswith(TOO_SMALL))
        if small and all(r and r.startswith((TOO_SMALL, "project", "byo site")) for r in reasons):
            return (f"model {request.model!r} cannot be hosted on any site project {request.project!r} may use: "
                    f"{small[0]}")
        if all(r and r.startswith(("project", "byo site")) for r in reasons):
            return f"project {request.project!r} may not spend at any site that serves {request.model!r}"
        if all(r and (r.startswith(("balance", "project", "byo"))) for r in reasons):
            return f"{NO_BALANCE}: project {request.project!r} lacks the SUs for this request at every eligible site"
        return f"no replica of {request.model}@{request.version} can take the request now"
