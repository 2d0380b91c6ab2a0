"""Whether ``tpm serve`` keeps something for every request: its resident memory over many 1-token requests.

``tpm serve`` on the demo model (``--backend``, one replica) in its own
process; ``--clients`` concurrent loops send 1-token completions, first
``--warm`` of them, then ``--requests`` more in steps of ``--step``. The
service's RSS (its own process, not its site's workers) is read before and
after each step. A service that keeps nothing per request levels off; one
that keeps something grows by about the same amount every step.

psutil reads the RSS (the ``bench`` extra). The figures are the growth, not a
ratio: there is no baseline server that does the same bookkeeping.

Usage:
    python scripts/bench_service_memory.py [--requests 20000] [--step 5000] [--warm 2000] [--clients 64]
        [--backend vllm|torch] [--demo-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench_service import bench_home, drive, tpm_serve
from benchlib import demo_model, log, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--step", type=int, default=5_000)
    parser.add_argument("--warm", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--backend", choices=["torch", "vllm"], default="vllm")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a trained demo model folder to copy (default: train one, ~15 s on an idle machine)")
    args = parser.parse_args()

    import psutil

    from tpm_fed.connection import running_service

    print(f"bench_service_memory: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-memory-") as scratch:
        scratch = Path(scratch)
        home = bench_home(scratch / "home", demo_model(scratch / "demo", args.demo_dir), args.backend)
        with tpm_serve(home) as (url, headers):
            service = psutil.Process(running_service(home).pid)

            def requests(count: int) -> tuple[int, float]:
                """Send about ``count`` (whole rounds of the clients): how many were sent, and per second."""
                each = max(1, count // args.clients)
                started = time.perf_counter()
                asyncio.run(drive(url, "model", args.clients, each, 1, headers))
                return args.clients * each, args.clients * each / (time.perf_counter() - started)

            log(f"warming with {args.warm} requests...")
            warmed, _ = requests(args.warm)
            first = after = service.memory_info().rss
            sent = 0
            while sent < args.requests:
                before = service.memory_info().rss
                step, rate = requests(args.step)
                sent += step
                after = service.memory_info().rss
                print(f"  after {sent:7,} requests: RSS {after / 1e6:7.1f} MB ({(after - before) / 1e6:+5.1f} MB "
                      f"this step, {rate:.0f} req/s)", flush=True)
    grown = after - first
    if not sent:
        raise SystemExit("no request was timed: give a positive --requests")
    print(f"the service's RSS grew {grown / 1e6:+.1f} MB over {sent:,} requests after {warmed:,} to warm "
          f"({grown / sent * 10_000 / 1e6:+.2f} MB per 10,000; {args.backend} backend, {args.clients} clients)")


if __name__ == "__main__":
    main()
