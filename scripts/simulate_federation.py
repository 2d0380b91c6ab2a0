"""A simulated day of a federation: the broker vs two naive policies, in one run.

20 sites in 5 regions (2 of them projects' own compute), 3 models, 12
projects in different regions with grants at a few sites, and a day of
requests whose rate follows the sun. Every policy drives the same replica
mechanics: a replica serves one request at a time; a new one costs a cold
start (and its SUs) and takes a free slot or the slot of the least recently
used idle replica; idle replicas stop after the keep-alive. Placement:

* ``broker``: tpm-fed's own placement (``tpm_fed.broker.Placer``), fed the
  simulated replicas' queue depths and service times;
* ``nearest``: the nearest site the project may use;
* ``round-robin``: the sites the project may use, in turn.

Reported per policy: p50/p95 latency (network + queue + cold start + service),
the share within the SLO, SUs spent per project, replica-hours, cold starts.

Usage:
    python scripts/simulate_federation.py [--requests 30000] [--slo 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field

from benchlib import log

REGIONS = ["chicago", "berkeley", "oakridge", "argonne", "austin"]
MODELS = ["llm-70b", "llm-8b", "science-13b"]
COLD_START_S = 90.0
KEEP_ALIVE_S = 900.0
PROMPT_TOKENS, COMPLETION_TOKENS = 400, 200


def build_federation(rng: random.Random):
    from tpm_fed.federation import Federation

    sites = [{"name": f"rcc{i}", "location": REGIONS[i % 5], "capacity": {"max_replicas": 3},
              "cold_start_s": COLD_START_S, "keep_alive_s": KEEP_ALIVE_S} for i in range(18)]
    sites += [{"name": f"own{i}", "billing": "byo", "owner": f"p{i}", "location": REGIONS[i],
               "capacity": {"max_replicas": 1}, "cold_start_s": COLD_START_S, "keep_alive_s": KEEP_ALIVE_S}
              for i in range(2)]
    projects = [{"name": f"p{i}", "members": [f"u{i}"],
                 "allocations": {f"rcc{s}": 1e6 for s in rng.sample(range(18), 4)}} for i in range(12)]
    latency = {a: {b: 5.0 + 25.0 * abs(i - j) for j, b in enumerate(REGIONS) if j > i} for i, a in enumerate(REGIONS)}
    return Federation.model_validate({
        "sites": sites, "models": [{"name": m, "path": f"/m/{m}"} for m in MODELS], "projects": projects,
        "latency_ms": latency, "default_location": REGIONS[0],
    })


@dataclass
class SimReplica:
    view: object  # ReplicaView, which the broker reads
    started: float
    stopped: float | None = None
    busy_until: float = 0.0
    finishing: deque = field(default_factory=deque)  # completion times of assigned requests


class Simulation:
    """Replica mechanics shared by every policy."""

    def __init__(self, federation, policy: str) -> None:
        from tpm_fed.broker import Placer

        self.federation = federation
        self.policy = policy
        self.placer = Placer(federation)
        self.replicas: dict[str, SimReplica] = {}
        self.by_model: dict[str, list[SimReplica]] = defaultdict(list)
        self.live: dict[str, int] = defaultdict(int)
        self.turn: dict[str, int] = defaultdict(int)
        self.cold_starts = 0
        self.counter = 0
        self.usable = {p.name: [s for s in federation.sites if s.name in p.allocations or s.owner == p.name]
                       for p in federation.projects}

    def refresh(self, now: float) -> None:
        for replica in self.replicas.values():
            if replica.stopped is not None:
                continue
            while replica.finishing and replica.finishing[0] <= now:
                replica.finishing.popleft()
            replica.view.queue_depth = len(replica.finishing)
            if not replica.finishing and replica.busy_until + KEEP_ALIVE_S < now:
                self.stop(replica, replica.busy_until + KEEP_ALIVE_S)

    def stop(self, replica: SimReplica, when: float) -> None:
        replica.stopped, replica.view.state = when, "stopped"
        self.live[replica.view.site] -= 1

    def idle_victim(self, site: str, now: float) -> SimReplica | None:
        idle = [r for r in self.replicas.values()
                if r.stopped is None and r.view.site == site and not r.finishing]
        return min(idle, key=lambda r: r.busy_until, default=None)

    def start(self, site: str, model: str, now: float) -> SimReplica:
        from tpm_fed.broker import ReplicaView

        self.counter += 1
        view = ReplicaView(f"{site}/{model}/{self.counter}", site, model, "v1", "warm", 0, 2.0, now)
        replica = SimReplica(view, now, busy_until=now + COLD_START_S)
        self.replicas[view.replica_id] = replica
        self.by_model[model].append(replica)
        self.live[site] += 1
        self.cold_starts += 1
        return replica

    def choose(self, project: str, model: str, location: str, now: float) -> tuple[str, SimReplica | None]:
        """A site, and the replica there to use (None: start one)."""
        from tpm_fed.broker import PlacementRequest

        if self.policy == "broker":
            request = PlacementRequest(f"u-{project}", project, model, "v1", "generate", location, 1)
            live = [r.view for r in self.by_model[model] if r.stopped is None]
            decision = self.placer.place(request, live, self.live, lambda s: (v.view if (v := self.idle_victim(s, now)) else None),
                                         lambda site, p=project: 10**12, lambda s: None)
            chosen = decision.chosen
            if chosen is None:
                raise RuntimeError(decision.explain())
            return chosen.site, self.replicas.get(chosen.replica_id) if chosen.replica_id else None
        sites = self.usable[project]
        if self.policy == "nearest":
            site = min(sites, key=lambda s: (self.placer.latency_s(location, s), s.name)).name
        else:
            site = sites[self.turn[project] % len(sites)].name
            self.turn[project] += 1
        here = [r for r in self.by_model[model] if r.stopped is None and r.view.site == site]
        return site, min(here, key=lambda r: r.busy_until, default=None)

    def serve(self, project: str, model: str, location: str, now: float, service_s: float) -> tuple[float, bool, str]:
        self.refresh(now)
        site, replica = self.choose(project, model, location, now)
        cold = replica is None
        if cold:
            capacity = self.placer.sites[site].capacity.max_replicas
            if self.live[site] >= capacity:
                victim = self.idle_victim(site, now)
                if victim is None:  # every slot busy: the new replica waits for the first to finish
                    victim = min((r for r in self.replicas.values() if r.stopped is None and r.view.site == site),
                                 key=lambda r: r.busy_until)
                    now_start = victim.busy_until
                    self.stop(victim, now_start)
                    replica = self.start(site, model, max(now, now_start))
                else:
                    self.stop(victim, now)
                    replica = self.start(site, model, now)
            else:
                replica = self.start(site, model, now)
        begin = max(now, replica.busy_until)
        replica.busy_until = begin + service_s
        replica.finishing.append(replica.busy_until)
        replica.view.queue_depth = len(replica.finishing)
        replica.view.service_s = 0.7 * replica.view.service_s + 0.3 * service_s
        network = 2 * self.placer.latency_s(location, self.placer.sites[site])
        return replica.busy_until - now + network, cold, site


def run(policy: str, federation, arrivals, price) -> dict:
    from tpm_fed.ledger import Metered, price_usu

    sim = Simulation(federation, policy)
    latencies, spent = [], defaultdict(int)
    for when, project, model, location, service_s in arrivals:
        latency, cold, site = sim.serve(project, model, location, when, service_s)
        latencies.append(latency)
        if not site.startswith("own"):
            spent[project] += price_usu(price, Metered(PROMPT_TOKENS, COMPLETION_TOKENS, cold_start=cold))
    end = arrivals[-1][0]
    hours = sum(((r.stopped if r.stopped is not None else end) - r.started) for r in sim.replicas.values()) / 3600
    latencies.sort()
    return {"latencies": latencies, "spent": spent, "replica_hours": hours, "cold_starts": sim.cold_starts}


def arrivals_for_a_day(federation, requests: int, rng: random.Random):
    projects = [p.name for p in federation.projects]
    weights = [rng.choice([1, 1, 2, 5]) for _ in projects]
    home = {p: REGIONS[i % 5] for i, p in enumerate(projects)}
    favourite = {p: rng.choice(MODELS) for p in projects}
    mean_gap = 86400 / requests
    events, now = [], 0.0
    while len(events) < requests:
        daylight = 1 + 0.8 * math.sin(2 * math.pi * (now / 86400 - 0.25))  # peaks mid-day
        now += rng.expovariate(daylight / mean_gap)
        project = rng.choices(projects, weights)[0]
        model = favourite[project] if rng.random() < 0.8 else rng.choice(MODELS)
        events.append((now, project, model, home[project], rng.lognormvariate(math.log(2.0), 0.5)))
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument("--slo", type=float, default=30.0, help="latency objective in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    federation = build_federation(rng)
    arrivals = arrivals_for_a_day(federation, args.requests, rng)
    price = federation.prices.generate
    results = {}
    for policy in ("broker", "nearest", "round-robin"):
        log(f"simulating a day under {policy}...")
        results[policy] = run(policy, federation, arrivals, price)

    print(f"a simulated day: {args.requests} requests, 20 sites, 12 projects, SLO {args.slo:g} s")
    print(f"{'policy':<12} {'p50 s':>8} {'p95 s':>8} {'within SLO':>11} {'SU total':>10} {'replica-h':>10} {'cold starts':>12}")
    for policy, r in results.items():
        lat = r["latencies"]
        within = sum(x <= args.slo for x in lat) / len(lat)
        print(f"{policy:<12} {statistics.median(lat):>8.1f} {lat[int(0.95 * len(lat))]:>8.1f} {within:>10.1%} "
              f"{sum(r['spent'].values()) / 1e6:>10.1f} {r['replica_hours']:>10.1f} {r['cold_starts']:>12}")
    print("SUs per project (broker / nearest / round-robin):")
    for project in sorted({p for r in results.values() for p in r["spent"]}, key=lambda p: int(p[1:])):
        row = " / ".join(f"{results[pol]['spent'].get(project, 0) / 1e6:8.1f}" for pol in results)
        print(f"  {project:<4} {row}")


if __name__ == "__main__":
    main()
