"""How many batch rows an interactive request can share vLLM's steps with: the trade-off table.

On ``vllm.LLM`` in this process (the demo model, the engine the vLLM backend
drives), K batch rows (32 greedy tokens each, at the batch priority) are kept
running: each one that ends is replaced at once, as a capped worker would let
the next held line in. ``--gap`` seconds after the last one ended (as
``bench_batch_priority.py --every`` does), an interactive 8-token request
(priority 0) is added and timed from ``add_request`` to its last token. For
each K: the interactive median, its ratio to K = 0 (the idle engine), and the
batch's lines per second in the same window (what a cap of K costs a batch).
First, the time of one engine step with K + 1 rows decoding (fastest of
``--steps``): on a loaded machine the least noisy view of the same trade-off.

Two variants of an uncapped batch show whether a cap that acts only while an
interactive request runs would help (``--variants``):

- ``pause``: 64 rows, but no batch row enters while an interactive one runs
  (rows that end are not replaced until it is done);
- ``abort-to-K``: 64 rows; when an interactive request arrives, the batch rows
  beyond K are taken out (their tokens so far kept) and re-added, prompt plus
  those tokens, once it is done.

Usage:
    python scripts/bench_batch_rows.py [--rows 0,2,4,8,16,64] [--samples 4] [--rounds 4] [--gap 0.25] [--tokens 32]
        [--demo-dir DIR] [--variants]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PROMPTS, Share, demo_model, described, log, machine, share_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INTERACTIVE_PROMPT = "The telescope"


class Bench:
    """One engine and the loop that keeps K batch rows in it while interactive requests are timed."""

    def __init__(self, model_dir: Path, tokens: int) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from functions.backends.interactive_first import InteractiveFirst

        self.llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0,
                       distributed_executor_backend="uni", scheduling_policy="priority", disable_log_stats=True,
                       scheduler_cls=InteractiveFirst)
        self.engine = self.llm.llm_engine
        # The replica's scheduler, pausing nothing but where a share says so (worker_loop).
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.scheduler.paused_beyond = self.scheduler.tokens_after = None
        tokenizer = self.llm.get_tokenizer()
        self.prompts = [tokenizer.encode(p) for p in PROMPTS]
        self.interactive = tokenizer.encode(INTERACTIVE_PROMPT)
        self.tokens = tokens
        self.ids = itertools.count()

    def _params(self, tokens: int):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0)

    def _add_batch(self, ids: list[int], tokens: int, every_step: bool) -> str:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from tpm_fed.protocol.generation import BATCH_PRIORITY

        rid = f"b{next(self.ids)}"
        params = self._params(tokens)
        # As the worker asks for a quiet row's; abort-to-K needs each step's tokens to re-add a row.
        params.output_kind = RequestOutputKind.CUMULATIVE if every_step else RequestOutputKind.FINAL_ONLY
        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params, priority=BATCH_PRIORITY)
        return rid

    def step_times(self, rows: int, steps: int) -> list[float]:
        """Seconds per engine step with ``rows`` rows decoding (sorted): the cost an interactive row
        shares with K batch rows is one step with K + 1 rows, per token."""
        from vllm.inputs import TokensPrompt

        ids = [f"s{next(self.ids)}" for _ in range(rows)]
        for index, rid in enumerate(ids):
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=self.prompts[index % len(self.prompts)]),
                                    self._params(steps + 8))
        for _ in range(3):  # past the prefill
            self.engine.step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - started)
        self.engine.abort_request(ids)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return sorted(times)

    def run(self, rows: int, samples: int, gap: float, variant: str | None = None,
            cap: int = 0) -> tuple[list[float], list[float], float]:
        """Interactive latencies (s), the CPU seconds this process spent over each, and batch lines per
        second, with ``rows`` batch rows kept running."""
        from vllm import SamplingParams  # noqa: F401 - imported once here, not inside the timed loop
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.engine
        batch: dict[str, tuple[list[int], int]] = {}  # running batch row -> (prompt ids, tokens asked)
        made: dict[str, list[int]] = {}  # tokens each running batch row made so far (abort-to-K only)
        parked: list[tuple[list[int], int]] = []  # rows taken out while an interactive one runs
        prompts = itertools.cycle(self.prompts)

        def fill() -> None:
            while len(batch) < rows:
                if parked:
                    ids, left = parked.pop()
                else:
                    ids, left = next(prompts), self.tokens
                rid = self._add_batch(ids, left, variant == "abort-to-K")
                batch[rid] = (ids, left)

        fill()
        for _ in range(5):  # past the first prefills
            engine.step()
        latencies: list[float] = []
        cpu: list[float] = []  # this process's CPU time over each interactive request: less hit by others' load
        lines = 0
        started = time.perf_counter()
        interactive: tuple[str, float, float] | None = None
        ended = started
        while len(latencies) < samples:
            if interactive is None and time.perf_counter() - ended >= gap:
                rid = f"i{next(self.ids)}"
                params = self._params(8)
                params.output_kind = RequestOutputKind.FINAL_ONLY
                if variant == "abort-to-K" and len(batch) > cap:
                    out = sorted(batch)[cap:]
                    engine.abort_request(out)
                    for bid in out:
                        ids, left = batch.pop(bid)
                        done = made.pop(bid, [])
                        parked.append((ids + done, left - len(done)))
                interactive = (rid, time.perf_counter(), time.process_time())
                engine.add_request(rid, TokensPrompt(prompt_token_ids=self.interactive), params, priority=0)
            for output in engine.step():
                rid = output.request_id
                if interactive is not None and rid == interactive[0]:
                    if output.finished:
                        ended = time.perf_counter()
                        latencies.append(ended - interactive[1])
                        cpu.append(time.process_time() - interactive[2])
                        interactive = None
                    continue
                if rid in batch and variant == "abort-to-K":
                    made[rid] = list(output.outputs[0].token_ids)
                if output.finished and rid in batch:
                    del batch[rid]
                    made.pop(rid, None)
                    lines += 1
            if variant is None or interactive is None:
                fill()
            if not engine.has_unfinished_requests():  # K = 0: idle until the next interactive request
                time.sleep(0.001)
        elapsed = time.perf_counter() - started
        unfinished = list(batch) + ([interactive[0]] if interactive else [])
        if unfinished:
            engine.abort_request(unfinished)
        while engine.has_unfinished_requests():
            engine.step()
        return latencies, cpu, lines / elapsed


class _EveryFewSteps:
    """A live task (functions.joining.JoinableTask's members) in which an interactive 8-token request joins
    every ``every`` steps once the last one ended, and each is timed from joining to its answer."""

    def __init__(self, backend, every: int) -> None:
        self.backend, self.every, self.steps = backend, every, 0
        self.cancelled: set[str] = set()
        self.waiting: tuple[str, float] | None = None
        self.latencies: list[float] = []

    def send(self, chunks) -> None:
        self.steps += 1

    def started(self, item) -> None:
        pass

    def joined(self) -> list:
        from tpm_fed.protocol.requests import GenerationRequest

        if self.waiting is not None or self.steps < 5 or self.steps % self.every:
            return []
        request = GenerationRequest.create(INTERACTIVE_PROMPT, "demo", max_new_tokens=8, min_new_tokens=8)
        self.waiting = (request.request_id, time.perf_counter())
        return [self.backend.encode(request)]

    def idle_joined(self) -> list:
        return []  # the task ends when its lines are done

    def close(self) -> list:
        return []

    def finished(self, item, completions) -> None:
        if self.waiting is not None and item.request.request_id == self.waiting[0]:
            self.latencies.append(time.perf_counter() - self.waiting[1])
            self.waiting = None


def worker_loop(bench: Bench, shares: list[Share], lines: int, rounds: int,
                samples: int, gap: float) -> None:
    """The worker's own step loop (``VllmBackend._run_live``) with each share of its engine (a cap, and the
    batch rows kept beside an interactive one: :func:`benchlib.share_of`): a task of ``lines`` batch lines,
    interactive requests joining every 15 steps; their latency and the task's time. First the same
    interactive request on the idle engine, the reference for the ratio."""
    from functions.backends.interactive_first import paused_beyond, tokens_after
    from functions.backends.vllm_backend import VllmBackend
    from tpm_fed.protocol.requests import BATCH_PRIORITY, GenerationRequest

    results: dict[tuple, tuple[list[float], list[float]]] = {share: ([], []) for share in shares}
    idle: list[float] = []
    for _ in range(rounds):
        idle += bench.run(0, samples, gap)[0]
        for share in shares:
            # As a replica's scheduler reads its site's settings:
            bench.scheduler.paused_beyond = paused_beyond(share[1])
            bench.scheduler.tokens_after = tokens_after(share[2])
            backend = VllmBackend(bench.llm, 256, torch_threads_before=1, batch_rows=share[0])
            task = [backend.encode(GenerationRequest.create(PROMPTS[i % len(PROMPTS)], "demo", max_new_tokens=bench.tokens,
                                                            min_new_tokens=bench.tokens, priority=BATCH_PRIORITY))
                    for i in range(lines)]
            live = _EveryFewSteps(backend, 15)
            started = time.perf_counter()
            backend.generate(task, live)
            results[share][0].extend(live.latencies)
            results[share][1].append(time.perf_counter() - started)
            bench.scheduler.paused_beyond = bench.scheduler.tokens_after = None
    print(f"\nthe worker's step loop (VllmBackend._run_live), a task of {lines} batch lines of {bench.tokens} tokens, "
          f"an interactive 8-token request joining every 15 steps, {rounds} rounds "
          f"(load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"idle engine: the interactive request median {statistics.median(idle) * 1000:.1f} ms "
          f"(fastest {min(idle) * 1000:.1f}, {len(idle)} samples)")
    print("| the engine's share | interactive median (fastest, samples) | ratio to idle | the task, median "
          "| batch lines/s |")
    print("|---|---|---|---|---|")
    for share, (latencies, times) in results.items():
        task_s = statistics.median(times)
        print(f"| {described(share)} | {statistics.median(latencies) * 1000:.1f} ms "
              f"({min(latencies) * 1000:.1f}, {len(latencies)}) | {statistics.median(latencies) / statistics.median(idle):.2f}x "
              f"| {task_s:.2f} s | {lines / task_s:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="0,2,4,8,16,64")
    parser.add_argument("--samples", type=int, default=4, help="interactive requests per run and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="engine steps timed per row count")
    parser.add_argument("--gap", type=float, default=0.25, help="seconds from one interactive request's end to the next")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per batch line")
    parser.add_argument("--demo-dir", type=Path, default=None)
    parser.add_argument("--variants", action="store_true", help="also the uncapped batch's two dynamic variants")
    parser.add_argument("--variant-cap", type=int, default=4)
    parser.add_argument("--worker-loop", default=None,
                        help="only the worker's own step loop with these shares (CAP[:K], e.g. none,8,none:0): "
                             "see worker_loop")
    args = parser.parse_args()
    print(f"bench_batch_rows: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-rows-") as scratch:
        bench = Bench(demo_model(Path(scratch) / "demo", args.demo_dir), args.tokens)
        bench.run(4, 4, args.gap)  # warm
        if args.worker_loop:
            worker_loop(bench, [share_of(spec) for spec in args.worker_loop.split(",")], 64, args.rounds,
                        args.samples, args.gap)
            return
        step_rows = [int(r) + 1 for r in args.rows.split(",")]
        log(f"step times with {step_rows} rows...")
        steps = {rows: bench.step_times(rows, args.steps) for rows in step_rows}
        runs = [(f"K = {rows}", rows, None) for rows in (int(r) for r in args.rows.split(","))]
        if args.variants:
            runs += [("64, pause", 64, "pause"), (f"64, abort-to-K (K = {args.variant_cap})", 64, "abort-to-K")]
        # Rounds, each run in turn within each, so the machine's load drifts over all alike.
        latencies: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for round_ in range(args.rounds):
            log(f"round {round_ + 1}/{args.rounds}")
            for name, rows, variant in runs:
                got, spent, rate = bench.run(rows, args.samples, args.gap, variant, args.variant_cap)
                latencies[name] += got
                cpu[name] += spent
                rates[name].append(rate)
        table = [(name, latencies[name], cpu[name], max(rates[name])) for name, _, _ in runs]
    one = steps[step_rows[0]][0]
    print(f"\none engine step, {args.steps} steps each: the fastest (the least hit by others' load), its ratio "
          "to one row's, and the median")
    print("| rows in the step (K batch + 1 interactive) | fastest | ratio to one row | median |")
    print("|---|---|---|---|")
    for rows, times in steps.items():
        print(f"| {rows} | {times[0] * 1000:.2f} ms | {times[0] / one:.2f}x | {statistics.median(times) * 1000:.2f} ms |")
    idle, idle_best = statistics.median(table[0][1]), min(table[0][1])
    full = max(rate for *_, rate in table) or 1.0
    print(f"\ninteractive 8-token request, {args.samples} x {args.rounds} samples, while K batch rows of "
          f"{args.tokens} tokens run (load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}); "
          "best: the fastest sample, the least hit by others' load; CPU: this process's CPU time over it")
    print("| batch rows in the engine | interactive median (max) | ratio to idle | best | best ratio | CPU median "
          "| batch lines/s (best round) | of the most |")
    print("|---|---|---|---|---|---|---|---|")
    for name, latencies, spent, rate in table:
        median, best = statistics.median(latencies), min(latencies)
        print(f"| {name} | {median * 1000:.1f} ms ({max(latencies) * 1000:.0f}) | {median / idle:.2f}x "
              f"| {best * 1000:.1f} ms | {best / idle_best:.2f}x | {statistics.median(spent) * 1000:.1f} ms "
              f"| {rate:.1f} | {rate / full:.2f} |")


if __name__ == "__main__":
    main()
