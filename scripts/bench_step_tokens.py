"""A burst of prompts on vLLM's engine alone, by the tokens one step may hold: first tokens and the burst's time.

Clients that send together (16 streams whose answers end in the same step)
hand a replica's engine a burst of prompts. This times one such burst on
``vllm.LLM``'s engine, stepped directly as a replica's worker steps it (one
torch thread on a CPU, vLLM's server's rows, chunked prefill), for each step
size asked (vLLM's ``max_num_batched_tokens``; vLLM's own server uses 2,048
on a CPU, a replica 512: ``functions/backends/step_size.py``): by default 16
prompts of 64 random tokens, 64 out (``ignore_eos``, greedy), as vLLM's
benchmark client's 16 streams send them (``--prompts 64 --output-tokens 1``:
its 64 clients of 1-token requests). Per burst: the median and the last first token, and when
the last row ended. Each step size runs in a process of its own (an engine a
process), the sizes in turn, ``--rounds`` bursts each after a warm-up burst,
and the whole ``--repeats`` times; ratios are against the first size of the
list in the same repeat.

Models: ``demo`` (the demo model) and ``smollm2`` (the 135 M-parameter
SmolLM2 of docs/store.md's facts, as a plain folder).

Usage:
    python scripts/bench_step_tokens.py [--models demo,smollm2] [--sizes 2048,512,256] [--rounds 3]
        [--repeats 2] [--prompts 16] [--output-tokens 64] [--demo-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_TOKENS = 64


def one_size(model_dir: str, size: int, rounds: int, prompts: int, output_tokens: int) -> list[dict[str, float]]:
    """In this process: an engine stepping at most ``size`` tokens, ``rounds`` timed bursts (after one warm-up)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from functions.backends.cpu_threads import engine_threads
    from functions.backends.step_size import step_limits

    if (threads := engine_threads()) is not None:
        torch._C.set_num_threads(threads)  # as the replica's loader sets them
    limits = {**step_limits(1, Path(model_dir), None), "max_num_batched_tokens": size}
    limits["max_num_seqs"] = min(limits.get("max_num_seqs", size), size)
    llm = LLM(model=model_dir, tokenizer=model_dir, dtype="float32", seed=0, enforce_eager=True,
              disable_log_stats=True, **limits)
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    sampling = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0)
    draw = random.Random(0)
    bursts = []
    for burst in range(rounds + 1):
        started = time.perf_counter()
        for row in range(prompts):
            ids = [draw.randrange(10, vocab - 1) for _ in range(PROMPT_TOKENS)]
            engine.add_request(f"b{burst}-{row}", TokensPrompt(prompt_token_ids=ids), sampling)
        first: dict[str, float] = {}
        last_end = 0.0
        while engine.has_unfinished_requests():
            for output in engine.step():
                at = time.perf_counter() - started
                first.setdefault(output.request_id, at)
                if output.finished:
                    last_end = at
        if burst:  # the first warms the engine up
            firsts = sorted(first.values())
            bursts.append({"median_ms": 1000 * statistics.median(firsts), "last_ms": 1000 * firsts[-1],
                           "burst_ms": 1000 * last_end})
    return bursts


def run_size(model_dir: Path, size: int, args: argparse.Namespace) -> list[dict[str, float]]:
    done = subprocess.run([sys.executable, __file__, "--one", str(model_dir), str(size), str(args.rounds),
                           str(args.prompts), str(args.output_tokens)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"step size {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--one":
        print(json.dumps(one_size(sys.argv[2], *map(int, sys.argv[3:]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,smollm2")
    parser.add_argument("--sizes", default="2048,512,256", help="tokens a step; ratios are against the first")
    parser.add_argument("--rounds", type=int, default=3, help="timed bursts per engine")
    parser.add_argument("--repeats", type=int, default=2, help="times the sizes run in turn")
    parser.add_argument("--prompts", type=int, default=16, help="prompts a burst")
    parser.add_argument("--output-tokens", type=int, default=64, help="tokens each makes")
    parser.add_argument("--demo-dir", type=Path, default=None, help="a trained demo model folder to copy")
    args = parser.parse_args()

    from bench_vllm_client import smollm2_folder
    from benchlib import demo_model, log, machine

    sizes = [int(size) for size in args.sizes.split(",")]
    started_on = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpm-bench-step-tokens-") as scratch:
        for model in args.models.split(","):
            model_dir = (demo_model(Path(scratch) / "demo", args.demo_dir) if model == "demo"
                         else smollm2_folder(Path(scratch)))
            for repeat in range(1, args.repeats + 1):
                medians = {}
                for size in sizes:
                    log(f"{model} repeat {repeat}: {size} tokens a step")
                    bursts = run_size(model_dir, size, args)
                    figures = {key: statistics.median(b[key] for b in bursts) for key in bursts[0]}
                    medians[size] = figures
                    rows.append((model, repeat, size, figures, medians[sizes[0]]))
    print(f"started {started_on}; ended {machine()}")
    print(f"vLLM's engine alone, a burst of {args.prompts} prompts x {PROMPT_TOKENS} tokens, {args.output_tokens} out; "
          f"medians of {args.rounds} bursts; ratios against {sizes[0]} tokens a step in the same repeat")
    print(f"{'model':8} {'repeat':>6} {'tokens':>6}  {'first token p50':>15} {'last first token':>16} "
          f"{'burst':>9}  ratios (p50, last, burst)")
    for model, repeat, size, figures, base in rows:
        print(f"{model:8} {repeat:>6} {size:>6}  {figures['median_ms']:>12.1f} ms {figures['last_ms']:>13.1f} ms "
              f"{figures['burst_ms']:>6.0f} ms  {figures['median_ms'] / base['median_ms']:.2f}x, "
              f"{figures['last_ms'] / base['last_ms']:.2f}x, {figures['burst_ms'] / base['burst_ms']:.2f}x")


if __name__ == "__main__":
    main()
