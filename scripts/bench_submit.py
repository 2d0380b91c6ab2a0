"""Where a warm ``tpm submit --max-tokens 8`` spends its time, and its median wall time.

Stages, each timed on its own (medians of ``--runs``), on a home whose service and replica are warm:

* interpreter start: ``python -c pass``;
* imports: ``python -c "import tpm_fed.cli, tpm_fed.cli.submit"``, less the start (the warm path imports
  no more: :mod:`tpm_fed.cli.quick_stream`);
* find the service: ``service.json`` and whether its pid is alive (``recorded_service``; no ``/health``:
  the next call is the health check);
* connect and ``GET /v1/models``: the default model, whether a replica is warm;
* the request: the streamed completion of 8 tokens on the same connection, to its last event.

Then the whole command, ``tpm submit "The cell" --max-tokens 8``, run ``--runs`` times as a user
runs it (a new process each time): its median is the figure (target: <= 0.3 s). Its CPU time (user +
system, from ``RUSAGE_CHILDREN``) is printed beside it: on a shared machine the wall time is mostly the
command waiting for a core, and the CPU time is what the command itself costs.

Usage:
    python scripts/bench_submit.py [--runs 15] [--demo-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import log, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TPM = [sys.executable, "-c", "from tpm_fed.cli import main; main()"]


def wall(command: list[str], env: dict[str, str], cpu: list[float] | None = None) -> float:
    """Seconds ``command`` took; its CPU seconds (user + system) go to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a trained demo model folder to copy (default: the first call trains one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tpm-bench-submit-"))
    env = {**os.environ, "TPM_HOME": str(root)}
    env.pop("TPM_URL", None)
    if args.demo_dir:
        (root / "models").mkdir(parents=True)
        shutil.copytree(args.demo_dir, root / "models" / "demo-llama")
    started_on = machine()
    try:
        log("first call: starts the service and the replica...")
        cold = wall([*TPM, "submit", "The cell", "--max-tokens", "8"], env)
        wall([*TPM, "submit", "The cell", "--max-tokens", "8"], env)
        stages: dict[str, list[float]] = {name: [] for name in (
            "interpreter start", "imports", "find the service", "GET /v1/models", "the request (8 tokens)")}
        whole: list[float] = []
        whole_cpu: list[float] = []
        from tpm_fed.cli.quick_stream import QuickStream
        from tpm_fed.cli.submit import completion_body
        from tpm_fed.connection import recorded_service

        for run in range(args.runs):
            log(f"  run {run + 1}/{args.runs}")
            start = wall([sys.executable, "-c", "pass"], env)
            stages["interpreter start"].append(start)
            stages["imports"].append(wall([sys.executable, "-c", "import tpm_fed.cli, tpm_fed.cli.submit"],
                                          env) - start)
            began = time.perf_counter()
            address = recorded_service(root.resolve())
            stages["find the service"].append(time.perf_counter() - began)
            began = time.perf_counter()
            stream = QuickStream(address)
            model = stream.models()[0]["id"]
            stages["GET /v1/models"].append(time.perf_counter() - began)
            began = time.perf_counter()
            "".join(stream.complete(completion_body("The cell", model, max_new_tokens=8)))
            stages["the request (8 tokens)"].append(time.perf_counter() - began)
            whole.append(wall([*TPM, "submit", "The cell", "--max-tokens", "8"], env, whole_cpu))
    finally:
        subprocess.run([*TPM, "service", "stop"], check=False, env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"started {started_on}; ended {machine()}")
    print(f"warm `tpm submit \"The cell\" --max-tokens 8`, medians of {args.runs} runs:")
    for name, samples in stages.items():
        print(f"  {name:30s} {statistics.median(samples) * 1000:8.1f} ms")
    print(f"  {'sum of the stages':30s} {sum(statistics.median(s) for s in stages.values()) * 1000:8.1f} ms")
    print(f"whole command, median:           {statistics.median(whole) * 1000:8.1f} ms  (target <= 300 ms; "
          f"min {min(whole) * 1000:.0f}, max {max(whole) * 1000:.0f}); the first (cold) call: {cold:.1f} s")
    print(f"whole command's CPU time, median: {statistics.median(whole_cpu) * 1000:8.1f} ms  "
          f"(min {min(whole_cpu) * 1000:.0f}, max {max(whole_cpu) * 1000:.0f})")


if __name__ == "__main__":
    main()
