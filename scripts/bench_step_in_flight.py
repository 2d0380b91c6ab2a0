"""The step in flight: what an interactive request waits for when it arrives while a batch's step runs.

On ``vllm.LLM`` in this process (the demo model, one thread, the replica's
scheduler :class:`functions.backends.interactive_first.InteractiveFirst`,
batch rows paused beside interactive ones), ``--lines`` batch lines of 32
greedy tokens are all added at once (the engine holds up to its
``max_num_seqs``, vLLM's server's 128 on a CPU), and an 8-token interactive
request *arrives* every ``--every`` seconds: it is timed from that moment,
and the engine takes it at its next step, as a worker's engine takes a
request its back channel received mid-step. For each T of ``--tokens-after``
(the site's ``worker.batch_tokens_after_interactive``; ``none``: plain
vLLM's steps), a step gives the batch rows at most T tokens for a second
after an interactive row. Prints the interactive median against the same
request on the idle engine, the batch's lines per second, and the steps'
median and longest time; the first T given is the baseline for the rate.

Usage:
    python scripts/bench_step_in_flight.py [--tokens-after none,64,16] [--lines 1024] [--every 0.25]
        [--rounds 2] [--demo-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import demo_model, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Engine:
    """The replica's engine: vLLM with the replica's policy and scheduler, batch rows paused (K = 0)."""

    def __init__(self, model_dir: Path) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import torch
        from vllm import LLM

        from functions.backends.interactive_first import InteractiveFirst

        torch.set_num_threads(1)  # a replica's engine on two cores (vllm_backend: every core but one)
        self.llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0,
                       distributed_executor_backend="uni", disable_log_stats=True, max_num_seqs=128,
                       max_num_batched_tokens=2048, scheduling_policy="priority", scheduler_cls=InteractiveFirst)
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.scheduler.paused_beyond = 0
        self.random = random.Random(0)
        self.ids = 0

    def _add(self, tokens: int, priority: int) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        prompt = [self.random.randrange(10, 500) for _ in range(self.random.randrange(8, 24))]
        self.ids += 1
        self.engine.add_request(f"r{self.ids}", TokensPrompt(prompt_token_ids=prompt), params, priority=priority)
        return f"r{self.ids}"

    def idle(self, samples: int) -> list[float]:
        """The interactive request alone, ``samples`` times (seconds)."""
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            self._add(8, 0)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            times.append(time.perf_counter() - started)
        return times

    def beside(self, lines: int, every: float, tokens_after: int | None) -> tuple[list[float], float, list[float]]:
        """Interactive latencies (s) while ``lines`` batch lines run, the batch's lines per second, and the
        steps' times (s)."""
        from tpm_fed.protocol.generation import BATCH_PRIORITY

        self.scheduler.tokens_after = tokens_after
        started = time.perf_counter()
        for _ in range(lines):
            self._add(32, BATCH_PRIORITY)
        arriving = started + 0.1
        waiting: dict[str, float] = {}
        latencies, steps, done = [], [], 0
        while self.engine.has_unfinished_requests():
            if time.perf_counter() >= arriving and done < lines - 64:  # arrived during the last step
                waiting[self._add(8, 0)] = arriving
                arriving += every
            step_started = time.perf_counter()
            outputs = self.engine.step()
            steps.append(time.perf_counter() - step_started)
            for output in outputs:
                if output.finished and output.request_id in waiting:
                    latencies.append(time.perf_counter() - waiting.pop(output.request_id))
                elif output.finished:
                    done += 1
        return latencies, lines / (time.perf_counter() - started), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens-after", default="none,64,16",
                        help="comma-separated T (worker.batch_tokens_after_interactive); 'none': plain steps")
    parser.add_argument("--lines", type=int, default=1024)
    parser.add_argument("--every", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2, help="each T this many times, interleaved")
    parser.add_argument("--demo-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = [None if t == "none" else int(t) for t in args.tokens_after.split(",")]

    print(f"bench_step_in_flight: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-step-") as scratch:
        engine = Engine(demo_model(Path(scratch) / "demo", args.demo_dir))
        engine.idle(3)  # warm
        idle: list[float] = []
        results: dict[int | None, tuple[list[float], list[float], list[float]]] = {t: ([], [], []) for t in settings}
        for _ in range(args.rounds):
            idle += engine.idle(10)
            for tokens_after in settings:
                latencies, rate, steps = engine.beside(args.lines, args.every, tokens_after)
                results[tokens_after][0].extend(latencies)
                results[tokens_after][1].append(rate)
                results[tokens_after][2].extend(steps)
    reference = statistics.median(idle)
    baseline = statistics.median(results[settings[0]][1])
    print(f"\nan 8-token interactive request arriving every {args.every} s while {args.lines} batch lines of 32 "
          f"tokens run, all in the engine; {args.rounds} rounds; idle engine: median {reference * 1000:.1f} ms")
    print("| batch tokens a step after an interactive row | interactive median (samples) | ratio to idle "
          "| batch lines/s (ratio) | step median / longest |")
    print("|---|---|---|---|---|")
    for tokens_after, (latencies, rates, steps) in results.items():
        rate = statistics.median(rates)
        said = "no limit (plain vLLM)" if tokens_after is None else str(tokens_after)
        print(f"| {said} | {statistics.median(latencies) * 1000:.1f} ms ({len(latencies)}) "
              f"| {statistics.median(latencies) / reference:.2f}x | {rate:.0f} ({rate / baseline:.2f}x) "
              f"| {statistics.median(steps) * 1000:.1f} / {max(steps) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
