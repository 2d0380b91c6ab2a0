"""Broker and ledger throughput, measured in one run.

* placements per second on a synthetic federation of 1,000 sites and 10,000
  live replicas (200 models, 100 projects with grants at 20 sites each,
  20 network locations), through ``Broker.decide`` (balances from the
  ledger snapshot, replicas from the registry), target >= 10,000/s;
* settled charges per second with 8 concurrent writer threads on SQLite
  (reserve, then settle twice: a duplicated completion), and the count of
  lost or double charges found by reconciling the ledger afterwards
  (target >= 1,000/s, and 0).

Usage:
    python scripts/bench_broker.py [--sites 1000] [--replicas 10000] [--placements 20000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import log


def synthetic_federation(sites: int, models: int, projects: int, grants_per_project: int, locations: int):
    from tpm_fed.federation import Federation

    rng = random.Random(0)
    names = [f"loc{i}" for i in range(locations)]
    latency = {a: {b: float(abs(i - j) * 10) for j, b in enumerate(names) if j > i} for i, a in enumerate(names)}
    return Federation.model_validate({
        "sites": [{"name": f"site{i}", "location": names[i % locations], "capacity": {"max_replicas": 64},
                   "cold_start_s": 30} for i in range(sites)],
        "models": [{"name": f"model{i}", "path": f"/models/{i}"} for i in range(models)],
        "projects": [
            {"name": f"project{p}", "members": [f"user{p}"],
             "allocations": {f"site{s}": 1e6 for s in rng.sample(range(sites), grants_per_project)}}
            for p in range(projects)
        ],
        "latency_ms": latency,
        "default_location": names[0],
    })


def bench_placement(args) -> float:
    from tpm_fed.broker import Broker, PlacementRequest, ReplicaRegistry, ReplicaView
    from tpm_fed.ledger import Ledger
    from tpm_fed.state import open_database

    rng = random.Random(1)
    federation = synthetic_federation(args.sites, 200, 100, 20, 20)
    folder = Path(tempfile.mkdtemp(prefix="tpm-bench-broker-"))
    engine = open_database(f"sqlite:///{folder / 'tpm.db'}")
    registry = ReplicaRegistry(engine)
    # Fill the registry in memory (10,000 inserts through the database would
    # time the database, not placement).
    for index in range(args.replicas):
        model = f"model{index % 200}"
        site = f"site{rng.randrange(args.sites)}"
        registry._remember(ReplicaView(f"{site}/{model}@v1/auto/{index}", site, model, "v1", "warm",
                                       rng.randrange(4), rng.uniform(0.2, 2.0), time.time()))
    broker = Broker(federation, Ledger(engine), registry)
    requests = [
        PlacementRequest(identity=f"user{p}", project=f"project{p}", model=f"model{rng.randrange(200)}",
                         version="v1", kind="generate", location=f"loc{rng.randrange(20)}", estimate_usu=10_000)
        for p in (rng.randrange(100) for _ in range(args.placements))
    ]
    log(f"placement: {args.sites} sites, {args.replicas} replicas, {args.placements} requests...")
    broker.decide(requests[0])
    started = time.perf_counter()
    placed = sum(broker.decide(r).chosen is not None for r in requests)
    elapsed = time.perf_counter() - started
    if placed != len(requests):
        raise SystemExit(f"only {placed} of {len(requests)} requests placed")
    return len(requests) / elapsed


def bench_settlement(args) -> tuple[float, int, int]:
    from tpm_fed.protocol.errors import InsufficientBalance
    from tpm_fed.ledger import Ledger, Metered
    from tpm_fed.state import open_database

    folder = Path(tempfile.mkdtemp(prefix="tpm-bench-ledger-"))
    ledger = Ledger(open_database(f"sqlite:///{folder / 'tpm.db'}"))
    ledger.sync_grants({("p", "s"): 1e9})
    per_writer = args.charges // 8
    settled_by_writers = [0] * 8

    def writer(index: int) -> None:
        for n in range(per_writer):
            request_id = f"w{index}-{n}"
            try:
                ledger.reserve(request_id, project="p", site="s", identity="u", model="m", version="v",
                               kind="generate", estimate_usu=2_000)
            except InsufficientBalance:
                continue
            charged = ledger.settle(request_id, Metered(prompt_tokens=10, completion_tokens=5), 1_000)
            charged += ledger.settle(request_id, Metered(prompt_tokens=10, completion_tokens=5), 1_000)
            settled_by_writers[index] += charged

    log(f"settlement: 8 writer threads x {per_writer} requests on SQLite...")
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    elapsed = time.perf_counter() - started
    statement = ledger.statement()
    (balance,) = ledger.balances()
    charged_total = sum(c.charged_usu for c in statement)
    lost = abs(balance.spent_usu - charged_total) // 1_000 + balance.reserved_usu // 2_000
    double = sum(1 for c in statement if c.charged_usu > 1_000) + abs(sum(settled_by_writers) - charged_total) // 1_000
    return len(statement) / elapsed, lost, double


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10000)
    parser.add_argument("--placements", type=int, default=20000)
    parser.add_argument("--charges", type=int, default=8000)
    args = parser.parse_args()
    placements = bench_placement(args)
    settlements, lost, double = bench_settlement(args)
    print(f"placements per second ({args.sites} sites, {args.replicas} replicas): {placements:10.0f}"
          f"   ({placements / 10_000:.2f}x the 10,000/s target)")
    print(f"settled charges per second (8 writers, SQLite):        {settlements:10.0f}"
          f"   ({settlements / 1_000:.2f}x the 1,000/s target)")
    print(f"lost charges: {lost}, double charges: {double}")


if __name__ == "__main__":
    main()
