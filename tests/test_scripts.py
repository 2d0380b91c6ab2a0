"""The simulation and the broker benchmark run, and the simulation's verdict holds.

No timing is asserted here: benchmarks print ratios, tests check behaviour.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_simulated_day_broker_beats_naive_policies_on_slo_and_replica_hours():
    import simulate_federation as simulation

    rng = random.Random(0)
    federation = simulation.build_federation(rng)
    arrivals = simulation.arrivals_for_a_day(federation, 4000, rng)
    results = {
        policy: simulation.run(policy, federation, arrivals, federation.prices.generate)
        for policy in ("broker", "nearest", "round-robin")
    }

    def within_slo(policy: str) -> float:
        latencies = results[policy]["latencies"]
        return sum(x <= 30 for x in latencies) / len(latencies)

    assert within_slo("broker") >= max(within_slo("nearest"), within_slo("round-robin"))
    assert results["broker"]["replica_hours"] < results["round-robin"]["replica_hours"]
    assert results["broker"]["cold_starts"] < results["round-robin"]["cold_starts"]
    assert all(len(r["latencies"]) == 4000 for r in results.values())


def test_broker_benchmark_runs_and_finds_no_lost_or_double_charges():
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_broker.py"), "--sites", "50", "--replicas", "500",
         "--placements", "500", "--charges", "400"],
        capture_output=True, text=True, timeout=300, cwd=SCRIPTS.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "lost charges: 0, double charges: 0" in done.stdout
