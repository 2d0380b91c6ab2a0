"""A replica split into pipeline stages over ranks vs the same model in one process, ratios in one run.

* per-token latency: one prompt, T new tokens greedy (seconds per token);
* throughput: 8 prompts at once, T new tokens each (tokens/s);
* cold start, from a fresh process to the first token (imports, weights, ranks
  started and joined): split vs one process;
* where the split replica's extra time goes, per generated token: the later
  stages' own compute (they report it) and the rest of rank 0's wait on the
  ring (sending and receiving the hidden states, waking the other rank).

"Nodes" are processes on this host (gloo over loopback): the transport is the
cheapest a cluster could have, and both ranks share this machine's cores.

Usage:
    python scripts/bench_multinode.py [--model-dir DIR] [--stages 2] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from benchlib import PROMPTS, interleaved, log, machine, paired_ratios

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLD_START = """
import sys, time
started = time.perf_counter()
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from functions.backends import load_backend
spec = ModelSpec.model_validate_json(sys.argv[1])
backend = load_backend(spec, "torch")
request = GenerationRequest.create(["The cell"], spec.name, max_new_tokens=1)
backend.generate([backend.encode(request)])
print(time.perf_counter() - started)
timings = getattr(backend, "start_timings", {})
print(timings.get("stage0_load_s", 0.0), timings.get("join_wait_s", 0.0))
backend.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face folder (default: the demo model, trained once)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=2)
    args = parser.parse_args()

    from functions.backends.pipeline_backend import PipelineBackend
    from functions.backends.torch_backend import TorchBackend
    from tpm_fed.protocol.model import ModelSpec
    from tpm_fed.protocol.requests import GenerationRequest
    from tpm_fed.protocol.versions import hash_model_dir

    model_dir = args.model_dir or _demo_model()
    spec = ModelSpec(name="bench", version=hash_model_dir(model_dir), path=str(model_dir), backend="torch",
                     pipeline_parallel_size=args.stages)
    whole_spec = spec.model_copy(update={"pipeline_parallel_size": 1})
    print(f"# {machine()}")
    print(f"# model {model_dir.name}, {args.stages} stages vs 1 process, {args.new_tokens} new tokens, "
          f"{args.repeats} repeats")

    log("loading the split replica and the one-process replica...")
    split, whole = PipelineBackend.load(spec), TorchBackend.load(whole_spec)
    tokens = args.new_tokens

    def run(backend, prompts):
        request = GenerationRequest.create(prompts, "bench", max_new_tokens=tokens, min_new_tokens=tokens)
        return lambda: sum(len(c.token_ids) for c in backend.generate([backend.encode(request)])[0])

    for name, prompts in (("latency, 1 prompt", PROMPTS[:1]), ("throughput, 8 prompts", PROMPTS[:8])):
        log(f"{name}: warming up, then {args.repeats} interleaved repeats")
        run(split, prompts)(), run(whole, prompts)()
        before = (split.pipeline.exchanges, split.pipeline.wait_s, split.pipeline.stages_s)
        whole_t, split_t = interleaved(args.repeats, run(whole, prompts), run(split, prompts))
        steps = split.pipeline.exchanges - before[0]
        wait = (split.pipeline.wait_s - before[1]) / steps
        remote = (split.pipeline.stages_s - before[2]) / steps
        ratios = paired_ratios(whole_t, split_t)
        best = lambda samples: max(t / s for s, t in samples)  # noqa: E731
        per_token = lambda samples: min(s / (t / len(prompts)) for s, t in samples)  # noqa: E731
        print(f"{name}: one process {best(whole_t):.1f} tok/s ({per_token(whole_t) * 1e3:.2f} ms/token), "
              f"{args.stages} stages {best(split_t):.1f} tok/s ({per_token(split_t) * 1e3:.2f} ms/token); "
              f"split/one throughput median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")
        print(f"  per forward step of the split replica: rank 0 waits {wait * 1e3:.2f} ms on the ring, of which "
              f"the later stages compute {remote * 1e3:.2f} ms and transport/wake-up takes {(wait - remote) * 1e3:.2f} ms")
    split.close()

    log(f"cold start, {args.cold_repeats} fresh processes each, interleaved")
    cold: dict[str, list[float]] = {"one": [], "split": []}
    parts: list[tuple[float, float]] = []
    for _ in range(args.cold_repeats):
        for name, which in (("one", whole_spec), ("split", spec)):
            out = subprocess.run([sys.executable, "-c", COLD_START, which.model_dump_json()], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            total, timings = out.stdout.strip().splitlines()[-2:]
            cold[name].append(float(total))
            if name == "split":
                stage0, join = (float(x) for x in timings.split())
                parts.append((stage0, join))
    ratio = [s / o for o, s in zip(cold["one"], cold["split"], strict=True)]
    print(f"cold start to first token: one process {min(cold['one']):.1f} s, {args.stages} stages "
          f"{min(cold['split']):.1f} s; split/one median {statistics.median(ratio):.2f}x")
    stage0, join = min(parts, key=sum)
    print(f"  split cold start: rank 0 loads its stage in {stage0:.1f} s (ranks start meanwhile), then waits "
          f"{join:.1f} s for the other ranks to load and join; the rest is imports and the first token")
    print(f"# after: {machine()}")


def _demo_model() -> Path:
    from tpm_fed.models.demo import make_demo_model

    trained = sorted((Path.home() / ".cache" / "tpm-fed-tests").glob("demo-llama-*/config.json"))
    if trained:  # the one the tests trained on this machine
        return trained[-1].parent
    cache = Path.home() / ".cache" / "tpm-fed-bench" / "demo-llama"
    if not (cache / "config.json").is_file():
        make_demo_model(cache, progress=False)
    return cache


if __name__ == "__main__":
    main()
