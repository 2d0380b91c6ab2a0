"""Throughput and added latency of tpm-fed's embedded path, as ratios in one run.

Baselines are measured in the same process and run, because these machines
are noisy:

* tokens/s through tpm-fed (warm local site: the real Globus Compute engine,
  one worker) vs the torch backend called directly in-process, for 1
  request and for N concurrent requests (target >= 0.9x at N=16);
* latency of a warm 1-token request vs one bare engine round trip of a
  trivial function (target: <= 5 ms added), and vs a bare task that sleeps
  as long as the backend works (the engine returns results of tasks that
  take milliseconds later than those of instant ones: Parsl's components
  poll their queues every 10 ms).

Usage:
    python scripts/bench_serving.py [--concurrent 16] [--new-tokens 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import wait
from pathlib import Path

from benchlib import PROMPTS, interleaved, log, machine, paired_ratios


def hold(seconds: float) -> float:
    """A trivial task that takes as long as the backend's work (shipped by value)."""
    import time  # shipped by value: the worker does not see this module's globals

    time.sleep(seconds)
    return seconds


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--home", type=Path, default=None, help="tpm home (default $TPM_HOME or ~/.tpm)")
    args = parser.parse_args()

    from functions.backends.torch_backend import TorchBackend
    from functions.serve import echo
    from tpm_fed.service.runtime import Runtime
    from tpm_fed.home import TpmHome
    from tpm_fed.protocol.requests import GenerationRequest

    home = TpmHome(args.home.resolve()) if args.home else TpmHome.default()
    log(f"home: {home.root} (the demo model is made on first use)")
    home.ensure_embedded_default(progress=True)
    client = Runtime(home)
    model_ref = client.default_model()
    spec = client.catalog.resolve(model_ref).spec.model_copy(update={"backend": "torch"})

    def requests(count: int, max_new_tokens: int) -> list[GenerationRequest]:
        return [
            GenerationRequest.create(
                PROMPTS[i % len(PROMPTS)], model_ref, max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, backend="torch",  # the baseline is the torch backend
            )
            for i in range(count)
        ]

    log("loading the torch backend in-process (the baseline)...")
    backend = TorchBackend.load(spec)

    def direct(count: int) -> int:
        batch = [backend.encode(r) for r in requests(count, args.new_tokens)]
        return sum(len(c.token_ids) for answer in backend.generate(batch) for c in answer)

    def through_tpm(count: int) -> int:
        futures = [client.submit(r) for r in requests(count, args.new_tokens)]
        wait(futures)
        return sum(f.result().usage.completion_tokens for f in futures)

    log("starting the local site and warming its replica...")
    through_tpm(1)

    started_on = machine()
    rows = []
    for count in (1, args.concurrent):
        log(f"throughput, {count} request(s) x {args.new_tokens} tokens, best of {args.repeats}...")
        direct(count)  # warm the in-process path too
        direct_runs, tpm_runs = interleaved(args.repeats, lambda: direct(count), lambda: through_tpm(count))
        (direct_s, direct_tokens), (tpm_s, tpm_tokens) = min(direct_runs), min(tpm_runs)
        if direct_tokens != tpm_tokens:
            raise SystemExit(f"token counts differ: direct {direct_tokens}, tpm-fed {tpm_tokens}")
        rows.append((count, direct_tokens / direct_s, tpm_tokens / tpm_s, paired_ratios(direct_runs, tpm_runs)))

    log(f"latency, {args.latency_samples} samples each...")
    site = client.site()

    def round_trip(function, *arguments) -> float:
        started = time.perf_counter()
        site.submit(function, *arguments).result()
        return time.perf_counter() - started

    warm, in_worker = [], []
    for _ in range(args.latency_samples):
        request = GenerationRequest.create("The cell", model_ref, max_new_tokens=1, backend="torch")
        started = time.perf_counter()
        result = client.submit(request).result()
        warm.append(time.perf_counter() - started)
        in_worker.append(result.timings.run_s)
    bare = [round_trip(echo, 1) for _ in range(args.latency_samples)]
    run_s = statistics.median(in_worker)
    held = [round_trip(hold, run_s) for _ in range(args.latency_samples)]
    client.close()

    bare_ms, warm_ms, run_ms, held_ms = median_ms(bare), median_ms(warm), run_s * 1e3, median_ms(held)
    print(f"started {started_on}; ended {machine()}")
    print(f"model {spec.name}@{spec.version}, exactly {args.new_tokens} new tokens per request, greedy")
    print(f"{'requests':>8} {'direct tok/s':>13} {'tpm-fed tok/s':>14} {'ratio':>6}   paired repeats: median (range)")
    for count, direct_rate, tpm_rate, paired in rows:
        print(f"{count:>8} {direct_rate:>13.0f} {tpm_rate:>14.0f} {tpm_rate / direct_rate:>6.2f}x   "
              f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})")
    print(f"bare engine round trip (echo), median:          {bare_ms:7.2f} ms")
    print(f"warm 1-token request through tpm-fed, median:   {warm_ms:7.2f} ms")
    print(f"  of which the backend's work in the worker:    {run_ms:7.2f} ms")
    print(f"added latency over the bare round trip:         {warm_ms - bare_ms:7.2f} ms")
    print(f"  excluding the backend's own work:             {warm_ms - bare_ms - run_ms:7.2f} ms")
    print(f"bare round trip of a task as long as that work: {held_ms:7.2f} ms")
    print(f"added latency over that round trip:             {warm_ms - held_ms:7.2f} ms")


if __name__ == "__main__":
    main()
