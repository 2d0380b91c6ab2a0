"""What multi-node replicas cost placement, measured in one run.

The federation of ``bench_broker.py`` (1,000 sites, 10,000 live replicas,
200 models, 100 projects with grants at 20 sites each), placed twice in the
same process, alternately:

* **one node**: every model one rank, no node-time price (placement as it was);
* **multi-node**: half the models split in 2 pipeline stages, half the sites
  giving 2-node blocks (the other half are listed as too small, with why), and
  a node-hour price, so each candidate's cost counts its nodes.

Prints placements per second of each and the ratio (multi-node / one node);
the broker's start (indexing which site fits which model) is timed too.

Usage:
    python scripts/bench_multinode_placement.py [--sites 1000] [--replicas 10000] [--placements 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from bench_broker import synthetic_federation
from benchlib import log


def multinode(federation):
    """Half the models in 2 stages, half the sites with 2-node blocks, node time priced."""
    from tpm_fed.federation import Nodes, Price, Prices

    sites = [s.model_copy(update={"nodes": Nodes(max_nodes_per_block=2, launcher="local-processes")})
             if i % 2 == 0 else s for i, s in enumerate(federation.sites)]
    models = [m.model_copy(update={"pipeline_parallel_size": 2}) if i % 2 == 0 else m
              for i, m in enumerate(federation.models)]
    prices = Prices(generate=Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5,
                                   per_node_hour=2.0))
    return federation.model_copy(update={"sites": sites, "models": models, "prices": prices})


def broker_for(federation, replicas: int, folder: Path):
    from tpm_fed.broker import Broker, ReplicaRegistry, ReplicaView
    from tpm_fed.ledger import Ledger
    from tpm_fed.state import open_database

    rng = random.Random(1)
    engine = open_database(f"sqlite:///{folder / 'tpm.db'}")
    registry = ReplicaRegistry(engine)
    for index in range(replicas):  # in memory: time placement, not the database
        model = f"model{index % 200}"
        site = f"site{rng.randrange(len(federation.sites))}"
        registry._remember(ReplicaView(f"{site}/{model}@v1/auto/{index}", site, model, "v1", "warm",
                                       rng.randrange(4), rng.uniform(0.2, 2.0), time.time()))
    started = time.perf_counter()
    broker = Broker(federation, Ledger(engine), registry)
    return broker, time.perf_counter() - started


def placements_per_s(broker, requests) -> float:
    broker.decide(requests[0])
    started = time.perf_counter()
    decided = [broker.decide(r) for r in requests]
    elapsed = time.perf_counter() - started
    if any(d.chosen is None for d in decided):
        raise SystemExit("a request was refused: the benchmark's federation is wrong")
    return len(requests) / elapsed


def main() -> None:
    from tpm_fed.broker import PlacementRequest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10000)
    parser.add_argument("--placements", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    one = synthetic_federation(args.sites, 200, 100, 20, 20)
    folder = Path(tempfile.mkdtemp(prefix="tpm-bench-multinode-"))
    (folder / "one").mkdir()
    (folder / "multi").mkdir()
    log("starting two brokers (one node, multi-node)...")
    brokers = {"one node": broker_for(one, args.replicas, folder / "one"),
               "multi-node": broker_for(multinode(one), args.replicas, folder / "multi")}
    rng = random.Random(2)
    requests = [PlacementRequest(identity=f"user{p}", project=f"project{p}", model=f"model{rng.randrange(200)}",
                                 version="v1", kind="generate", location=f"loc{rng.randrange(20)}",
                                 estimate_usu=10_000, cold_start_usu=500_000)
                for p in (rng.randrange(100) for _ in range(args.placements))]
    best = {name: 0.0 for name in brokers}
    for repeat in range(args.repeats):  # alternate, so both see the same machine load
        for name, (broker, _) in brokers.items():
            best[name] = max(best[name], placements_per_s(broker, requests))
        log(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {v:.0f}/s" for n, v in best.items()))
    print(f"load average: {os.getloadavg()[0]:.1f}")
    for name, (_, start_s) in brokers.items():
        print(f"{name:>10}: {best[name]:8.0f} placements/s (best of {args.repeats}); broker start {start_s:.3f} s")
    print(f"ratio multi-node / one node: {best['multi-node'] / best['one node']:.2f}x placements/s, "
          f"{brokers['multi-node'][1] / brokers['one node'][1]:.2f}x broker start")


if __name__ == "__main__":
    main()
