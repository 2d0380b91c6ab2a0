"""An interactive request while a batch runs: its latency against the same request on an idle replica.

On ``tpm serve`` over the demo model (``--backend``, one replica), the same
short completion is timed on the idle replica, then again every
``--every`` seconds while a batch of ``--lines`` completions runs. The batch's
lines wait behind interactive requests in the replica's queue
(``ReplicaDispatcher``: batch lines are background), so an interactive
request waits at most for the task running when it arrives; on the vLLM
backend it joins that task at its next step instead (continuous batching;
target: <= 1.5x the idle latency, median). ``--batch-rows`` caps the batch rows in the vLLM engine at once
(the site's ``worker.batch_rows``): the batch's other lines wait in the
worker, so the interactive request shares each step with fewer rows; each
cap given runs its own service, one after the other, and the batch's lines
per second say what the cap costs it. While an interactive request runs,
the replica's scheduler pauses the batch rows beyond K
(:mod:`functions.backends.interactive_first`): on a CPU all of them by
default; ``CAP:K`` sets K (the site's ``worker.batch_rows_beside_interactive``;
e.g. ``none:4``: no cap, four batch rows step beside it; ``none:100000``:
none paused). For a second after one, a step gives the batch rows at most T
tokens, so the next interactive request waits for a short step: 16 on a CPU
by default; ``CAP:K:T`` sets T (``worker.batch_tokens_after_interactive``;
``none:100000:100000``: plain vLLM's steps).

``--baseline`` then does the same on vLLM's own OpenAI server, started with
``--scheduling-policy priority``: the idle request, then the same request
while the batch's lines are sent as completions by ``--max-batch`` concurrent
clients at the batch priority (what the service's batch runner gives them),
the interactive ones at priority 0. That is the engine's own best on this
machine: how much of the slowdown is the replica sharing its steps, not the
service.

Usage:
    python scripts/bench_batch_priority.py [--lines 512] [--tokens 32] [--samples 20] [--every 0.25]
        [--max-batch 64] [--backend torch|vllm] [--batch-rows none,4,none:0] [--baseline]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import Share, demo_model, described, log, machine, share_engine, share_of
from bench_quotes import PROMPTS, batch_file
from bench_service import bench_home, start_vllm_server, tpm_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--every", type=float, default=0.25)
    parser.add_argument("--max-batch", type=int, default=64, help="the site's max_batch_requests (task size)")
    parser.add_argument("--backend", choices=["torch", "vllm"], default="vllm")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a trained demo model folder to copy (default: train one, ~15 s on an idle machine)")
    parser.add_argument("--batch-rows", default="none",
                        help="the site's cap on batch rows in a vLLM engine (worker.batch_rows, TPM_BATCH_ROWS): "
                             "'none' or a number, and ':K' to pause the batch rows beyond K while an "
                             "interactive request runs (worker.batch_rows_beside_interactive), and ':T' to "
                             "give batch rows at most T tokens a step just after one "
                             "(worker.batch_tokens_after_interactive); several, comma-separated, run one "
                             "service each (e.g. none,4,none:0:32)")
    parser.add_argument("--baseline", action="store_true",
                        help="also vLLM's own server (priority scheduling) under the same load")
    args = parser.parse_args()

    shares = [share_of(spec) for spec in args.batch_rows.split(",")]
    print(f"bench_batch_priority: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-priority-") as scratch:
        scratch = Path(scratch)
        model_dir = demo_model(scratch / "demo", args.demo_dir)
        runs = [service_run(args, model_dir, scratch / f"home-{index}", share) for index, share in enumerate(shares)]
        baseline = vllm_server_baseline(args, model_dir) if args.baseline else None  # the same model folder
    first_rate = None
    for share, (idle, during, lines_per_s) in zip(shares, runs, strict=True):
        ratio = statistics.median(during) / statistics.median(idle)
        first_rate = first_rate or lines_per_s
        print(f"\ninteractive completion (8 tokens) while a batch of {args.lines} x {args.tokens} tokens runs "
              f"(tasks of up to {args.max_batch}; {args.backend} backend; "
              f"{described(share)})")
        print(f"  idle replica:        median {statistics.median(idle) * 1000:8.1f} ms  ({len(idle)} samples)")
        print(f"  during the batch:    median {statistics.median(during) * 1000:8.1f} ms  ({len(during)} samples), "
              f"max {max(during) * 1000:.0f} ms")
        print(f"  ratio:               {ratio:8.2f}x   (target <= 1.5x)")
        print(f"  the batch:           {lines_per_s:8.1f} lines/s ({lines_per_s / first_rate:.2f}x the first run's)")
    if baseline is not None:
        idle, during = baseline
        print(f"\nthe same on vLLM's own server (priority scheduling; batch lines from {args.max_batch} clients)")
        print(f"  idle server:         median {statistics.median(idle) * 1000:8.1f} ms  ({len(idle)} samples)")
        print(f"  during the batch:    median {statistics.median(during) * 1000:8.1f} ms  ({len(during)} samples), "
              f"max {max(during) * 1000:.0f} ms")
        print(f"  ratio:               {statistics.median(during) / statistics.median(idle):8.2f}x")


def service_run(args: argparse.Namespace, model_dir: Path, folder: Path,
                share: Share) -> tuple[list[float], list[float], float]:
    """On ``tpm serve`` with the site's workers sharing the engine as ``share`` says (:func:`share_of`):
    the idle and the during-the-batch latencies, and the batch's lines per second (submitted to completed)."""
    from tpm_fed.client import Client

    home = bench_home(folder, model_dir, backend=args.backend)
    share_engine(home, share, max_batch=args.max_batch)
    with tpm_serve(home) as (url, headers):
        client = Client(url, headers["Authorization"].split()[1])

        def one() -> float:
            started = time.perf_counter()
            client.generate("The telescope", max_new_tokens=8).result()
            return time.perf_counter() - started

        one()
        idle = [one() for _ in range(args.samples)]
        log(f"{described(share)}: idle median {statistics.median(idle) * 1000:.0f} ms; "
            f"starting a batch of {args.lines} lines...")
        submitted = time.perf_counter()
        batch = client.batches.submit(batch_file(args.lines, [args.tokens]))
        while client.batches.retrieve(batch["id"])["status"] != "in_progress":
            time.sleep(0.05)
        during = []
        while len(during) < args.samples and client.batches.retrieve(batch["id"])["status"] == "in_progress":
            during.append(one())
            time.sleep(args.every)
        ended = client.batches.wait(batch["id"], poll_s=0.2)
        lines_per_s = args.lines / (time.perf_counter() - submitted)
        client.close()
    assert ended["status"] == "completed", ended
    if not during:
        raise SystemExit("the batch ended before any interactive request was timed: give more --lines")
    return idle, during, lines_per_s


def vllm_server_baseline(args: argparse.Namespace, model_dir: Path) -> tuple[list[float], list[float]]:
    """The same measurement on vLLM's own server, batch lines as concurrent low-priority completions:
    the idle and the during-the-batch latencies."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tpm_fed.protocol.generation import BATCH_PRIORITY

    log("starting vLLM's own server (--scheduling-policy priority)...")
    process, url = start_vllm_server(model_dir, "--scheduling-policy", "priority")
    try:
        body = {"model": "vllm-model", "prompt": "The telescope", "max_tokens": 8, "temperature": 0}
        with httpx.Client(base_url=url, timeout=600) as http:
            def one() -> float:
                started = time.perf_counter()
                http.post("/v1/completions", json={**body, "priority": 0}).raise_for_status()
                return time.perf_counter() - started

            one()
            idle = [one() for _ in range(args.samples)]
            log(f"vLLM's server idle: median {statistics.median(idle) * 1000:.0f} ms; "
                f"{args.lines} lines from {args.max_batch} clients...")
            lines = iter(range(args.lines))
            lock = threading.Lock()

            def client() -> None:
                with httpx.Client(base_url=url, timeout=600) as own:
                    while True:
                        with lock:
                            index = next(lines, None)
                        if index is None:
                            return
                        own.post("/v1/completions", json={
                            "model": "vllm-model", "prompt": PROMPTS[index % len(PROMPTS)], "temperature": 0,
                            "max_tokens": args.tokens, "priority": BATCH_PRIORITY}).raise_for_status()

            with ThreadPoolExecutor(args.max_batch) as pool:
                running = [pool.submit(client) for _ in range(args.max_batch)]
                time.sleep(0.5)
                during = []
                while len(during) < args.samples and not all(f.done() for f in running):
                    during.append(one())
                    time.sleep(args.every)
                for future in running:
                    future.result()
    finally:
        process.terminate()
        process.wait(timeout=60)
    return idle, during


if __name__ == "__main__":
    main()
