"""Cost of modes 2 and 3, as ratios against baselines run in the same process.

* saving the residual stream of every layer vs a plain forward pass of the
  same prompts (target <= 1.3x), both in the worker's process;
* logit lens over every layer vs a plain forward, and vs the same lens
  written as an nnsight trace on the same model (target: faster than nnsight);
* a mixed-adapter batch of 16 embedding requests through the whole path
  (client, broker, ledger, engine) vs the same 16 sent one after another.

The demo model is tiny (4 layers, 128 wide), so fixed costs weigh more on
it than on a real model; ``--size medium`` also measures a randomly
initialised 12-layer, 1024-wide Llama with the same tokenizer.

Usage:
    python scripts/bench_modes.py [--repeats 7] [--size small|medium|both]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

from benchlib import PROMPTS, log


def best(repeats: int, *runs) -> list[float]:
    """Fastest of ``repeats`` runs of each, taken in turn so drift hits all alike."""
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, samples):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    return [min(times) for times in samples]


def medium_model(demo_dir: Path, out: Path) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / name, out / name)
    return out


def bench_trace(model_dir: Path, repeats: int, label: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functions.interventions.tracer import Tracer
    from functions.policy import WorkerPolicy
    from tpm_fed.interventions import LogitLens, Save, TraceRequest

    log(f"[{label}] loading {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tracer = Tracer(model, tokenizer, 256, {2}, 0)
    layers = len(tracer.catalog.layers)
    residual = TraceRequest.create("m", prompts=PROMPTS, steps=[Save(point=p) for p in tracer.catalog.layers])
    lens = TraceRequest.create("m", prompts=PROMPTS, logit_lens=LogitLens(top_k=5))

    def plain():
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**batch)

    runs = [plain, lambda: tracer.run(residual, policy=WorkerPolicy()), lambda: tracer.run(lens, policy=WorkerPolicy())]
    names = ["plain forward", f"save residual x{layers} layers", "logit lens, all layers"]
    nnsight_run = _nnsight_lens(model_dir, layers)
    if nnsight_run is not None:
        runs.append(nnsight_run)
        names.append("nnsight logit lens (same model)")
    log(f"[{label}] timing {len(runs)} runs x {repeats} repeats")
    times = best(repeats, *runs)
    for name, seconds in zip(names, times, strict=True):
        print(f"{label:6} {name:34} {seconds * 1e3:8.2f} ms   {seconds / times[0]:5.2f}x plain")
    if nnsight_run is not None:
        print(f"{label:6} {'tpm lens vs nnsight lens':34} {times[2] / times[3]:17.2f}x (below 1: faster)")


def _nnsight_lens(model_dir: Path, layers: int):
    """The same lens (all layers, all positions, top 5) as an nnsight trace, or None without nnsight."""
    try:
        import nnsight  # noqa: F401
    except ImportError:
        log("nnsight is not installed: its comparison is skipped")
        return None
    source = f'''
import torch
from nnsight import LanguageModel
model = LanguageModel({str(model_dir)!r}, dispatch=True)
model.tokenizer.padding_side = "left"
def run(prompts):
    with model.trace(prompts):
        saved = []
''' + "".join(f"        h{i} = model.model.layers[{i}].output\n"
              f"        saved.append(torch.softmax(model.lm_head(model.model.norm(h{i})), -1).topk(5).save())\n"
              for i in range(layers))
    folder = Path(tempfile.mkdtemp())
    (folder / "nnsight_lens.py").write_text(source)  # nnsight traces must live in a file
    import importlib.util

    spec = importlib.util.spec_from_file_location("nnsight_lens", folder / "nnsight_lens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda: module.run(PROMPTS)


def bench_mixed_adapters(home: Path | None, repeats: int) -> None:
    import numpy as np
    import torch

    from functions.adapters.build import build_module
    from tpm_fed.adapters import Activation, Architecture, Linear
    from tpm_fed.home import TpmHome
    from tpm_fed.service.runtime import Runtime

    tpm_home = TpmHome(home) if home else TpmHome.default()
    tpm_home.ensure_embedded_default(progress=True)
    with Runtime(tpm_home) as client:
        hidden = client.catalog.hidden_size(client.catalog.resolve(client.default_model()).spec)
        refs = []
        for index in range(4):
            torch.manual_seed(index)
            architecture = Architecture(layers=[Linear(in_features=8, out_features=64), Activation(function="gelu"),
                                                Linear(in_features=64, out_features=hidden)])
            refs.append(client.adapters.register(f"bench-in-{index}", architecture,
                                                 build_module(architecture).state_dict()).ref)
        rng = np.random.default_rng(0)
        inputs = [rng.random((16, 8), dtype=np.float32) for _ in range(16)]

        def together():
            futures = [client.embed([x], input_module=refs[i % 4], pool="mean") for i, x in enumerate(inputs)]
            wait(futures)
            return max(f.result().replica.batch_size for f in futures)

        def one_by_one():
            for i, x in enumerate(inputs):
                client.embed([x], input_module=refs[i % 4], pool="mean").result()

        log("warming the replica")
        one_by_one()
        log(f"timing 16 mixed-adapter requests x {repeats} repeats")
        batched, sequential = best(repeats, together, one_by_one)
        print(f"mixed adapters: 16 together {batched * 1e3:.1f} ms, one by one {sequential * 1e3:.1f} ms: "
              f"{sequential / batched:.2f}x throughput (largest core batch {together()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", choices=["small", "medium", "both"], default="both")
    parser.add_argument("--home", type=Path, default=None, help="tpm home (default $TPM_HOME or ~/.tpm)")
    args = parser.parse_args()

    from tpm_fed.home import DEMO_MODEL_NAME, TpmHome

    home = TpmHome(args.home) if args.home else TpmHome.default()
    home.ensure_embedded_default(progress=True)
    demo = home.models_dir / DEMO_MODEL_NAME
    if args.size in ("small", "both"):
        bench_trace(demo, args.repeats, "small")
    if args.size in ("medium", "both"):
        with tempfile.TemporaryDirectory() as folder:
            log("making a random 12-layer, 1024-wide Llama")
            bench_trace(medium_model(demo, Path(folder) / "medium"), args.repeats, "medium")
    bench_mixed_adapters(args.home, args.repeats)


if __name__ == "__main__":
    main()
