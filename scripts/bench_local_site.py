"""What the local site's trust boundary costs: an encrypted interchange (CurveZMQ) vs a plain one, in one run.

The local site's interchange is encrypted so that only worker pools holding
the site's keys can register (docs/security.md). The baseline is the same
site with Parsl's plain interchange (what it used before), started in the
same process, both reading results as JSON. Each site is timed on:

* its first task (engine, interchange and worker pool start, and the handshake);
* tasks one at a time (the round trip: submit, interchange, worker, back);
* a burst of tasks in flight at once (throughput).

Usage:
    python scripts/bench_local_site.py [--tasks 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import log, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(site, tasks: int) -> dict[str, float]:
    """First-task seconds, median one-at-a-time seconds and burst seconds per task on a fresh ``site``."""
    from functions.serve import echo

    started = time.perf_counter()
    site.submit(echo, 0).result(timeout=300)
    first = time.perf_counter() - started
    one = []
    for index in range(tasks):
        started = time.perf_counter()
        site.submit(echo, {"i": index, "text": "x" * 100}).result(timeout=60)
        one.append(time.perf_counter() - started)
    started = time.perf_counter()
    for future in [site.submit(echo, index) for index in range(tasks)]:
        future.result(timeout=120)
    burst = (time.perf_counter() - started) / tasks
    site.shutdown()
    return {"first": first, "one": statistics.median(one), "burst": burst}


def main() -> None:
    from tpm_fed.sites.local import LocalSite

    class PlainLocalSite(LocalSite):
        """The baseline: Parsl's unencrypted interchange (any local pool may register)."""

        def _make_engine(self):
            engine = super()._make_engine()
            engine.executor.encrypted, engine.executor.cert_dir = False, None
            return engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    started_on = machine()
    root = Path(tempfile.mkdtemp(prefix="bench-local-site-"))
    results: dict[str, list[dict[str, float]]] = {"plain": [], "encrypted": []}
    for repeat in range(args.repeats):  # taken in turn, so drift hits both alike
        for name, kind in (("plain", PlainLocalSite), ("encrypted", LocalSite)):
            log(f"repeat {repeat + 1}/{args.repeats}: {name} interchange")
            site = kind(f"bench-{name}-{repeat}", root / f"{name}-{repeat}")
            measured = measure(site, args.tasks)
            if name == "encrypted":
                assert site.run_dir.joinpath("certificates").is_dir(), "the encrypted site made no keys"
            results[name].append(measured)
    print(f"started {started_on}; ended {machine()}")
    print(f"local site, echo tasks, {args.tasks} per measure, best of {args.repeats}:")
    best = {name: {key: min(run[key] for run in runs) for key in ("first", "one", "burst")}
            for name, runs in results.items()}
    for key, label, unit in (("first", "first task", 1.0), ("one", "one at a time", 1e3),
                             ("burst", f"{args.tasks} in flight", 1e3)):
        plain, encrypted = best["plain"][key] * unit, best["encrypted"][key] * unit
        suffix = "s" if key == "first" else "ms/task"
        print(f"{label:16} plain {plain:8.2f} {suffix:8} encrypted {encrypted:8.2f} {suffix:8} "
              f"{encrypted / plain:5.2f}x")


if __name__ == "__main__":
    main()
