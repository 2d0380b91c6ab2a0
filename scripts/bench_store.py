"""The model store: bytes stored for 10 versions, and load time, as ratios in one run.

A randomly initialized Llama (~33 M parameters, float32, ~130 MB) goes
through 10 successive versions, each made from the one before:

    1 base; 2 5% of tensors replaced; 3 one layer fine-tuned; 4 every weight
    plus small noise; 5 a rank-8 LoRA merged into q/v projections;
    6 5% replaced; 7 one layer fine-tuned; 8 LoRA merged; 9 5% replaced;
    10 one layer fine-tuned.

Printed: bytes the store holds vs 10 full copies, and vs the unique bytes
(distinct tensor contents across the versions: what any deduplicating store
must keep; target <= 1.2x); and the load time of a version from the store
(every chunk re-hashed, tensors memory-mapped) vs transformers'
``from_pretrained`` of the same model's directory (best of 5, in turn;
target <= 1.05x).

Usage:
    python scripts/bench_store.py [--hidden 512] [--layers 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import log


def make_versions(base: Path, count: int, hidden: int, layers: int, work: Path) -> list[Path]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=1024, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(base)
    rng = torch.Generator().manual_seed(1)
    patterns = ["replace5", "layer", "noise", "lora", "replace5", "layer", "lora", "replace5", "layer"]
    folders, current = [base], base
    for index, pattern in enumerate(patterns[: count - 1], start=2):
        log(f"  version {index}: {pattern}")
        tensors = load_file(current / "model.safetensors")
        names = sorted(tensors)
        if pattern == "replace5":
            for name in names[:: 20]:
                tensors[name] = torch.randn(tensors[name].shape, generator=rng) * tensors[name].std()
        elif pattern == "layer":
            layer = f"model.layers.{index % layers}."
            for name in (n for n in names if n.startswith(layer)):
                tensors[name] = tensors[name] + 1e-3 * torch.randn(tensors[name].shape, generator=rng)
        elif pattern == "noise":
            tensors = {n: t + 1e-4 * torch.randn(t.shape, generator=rng) for n, t in tensors.items()}
        elif pattern == "lora":
            for name in (n for n in names if n.endswith(("q_proj.weight", "v_proj.weight"))):
                out_features, in_features = tensors[name].shape
                low_rank = torch.randn(out_features, 8, generator=rng) @ torch.randn(8, in_features, generator=rng)
                tensors[name] = tensors[name] + 1e-3 * low_rank
        folder = work / f"v{index}"
        shutil.copytree(current, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
        current = folder
    return folders


def unique_bytes(folders: list[Path]) -> int:
    from safetensors import safe_open

    seen: dict[str, int] = {}
    for folder in folders:
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            for name in handle.keys():
                data = handle.get_tensor(name).contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                seen[hashlib.sha256(data).hexdigest()] = len(data)
        for path in folder.iterdir():
            if path.suffix == ".json":
                data = path.read_bytes()
                seen[hashlib.sha256(data).hexdigest()] = len(data)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from functions.store_loader import load_state_dict, materialize_files
    from tpm_fed.store import ModelStore

    work = Path(tempfile.mkdtemp(prefix="tpm-bench-store-"))
    log(f"making {args.versions} versions in {work}...")
    folders = make_versions(work / "v1", args.versions, args.hidden, args.layers, work)
    store = ModelStore(work / "store")
    ids = []
    for folder in folders:
        log(f"importing {folder.name}...")
        ids.append(store.import_dir(folder, "bench"))
    full = sum((f / "model.safetensors").stat().st_size for f in folders)
    unique, stored = unique_bytes(folders), store.stored_bytes()

    def from_store(verify: bool):
        def run():
            from transformers import AutoConfig
            from transformers.initialization import no_init_weights

            files = materialize_files(store, ids[-1])
            tensors = load_state_dict(store, ids[-1], verify=verify)
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(files), dtype=torch.float32)
            model.load_state_dict(tensors, strict=True, assign=True)
            return model
        return run

    def from_directory():
        return AutoModelForCausalLM.from_pretrained(folders[-1], dtype=torch.float32)

    import transformers

    transformers.logging.disable_progress_bar()
    log(f"load time, best of {args.repeats}, in turn...")
    def from_store_rehashing_all():
        shutil.rmtree(store.root / "verified", ignore_errors=True)  # forget: every chunk is re-hashed
        return from_store(True)()

    runs = {"from_pretrained": from_directory, "store": from_store(True), "store, no check": from_store(False),
            "store, full re-hash": from_store_rehashing_all}
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    sample = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        same = torch.equal(from_store(True)()(sample).logits, from_directory()(sample).logits)
    model_mb = (folders[0] / "model.safetensors").stat().st_size / 1e6
    shutil.rmtree(work, ignore_errors=True)
    print(f"{args.versions} versions of a {model_mb:.0f} MB model")
    print(f"10 full copies:        {full / 1e6:10.1f} MB")
    print(f"unique bytes:          {unique / 1e6:10.1f} MB")
    print(f"stored by tpm-fed:     {stored / 1e6:10.1f} MB   {stored / full:.2f}x full copies, "
          f"{stored / unique:.3f}x unique (target <= 1.2x)")
    print(f"load, from_pretrained(dir):          {best['from_pretrained']:.3f} s")
    base = best["from_pretrained"]
    for name, label in (("store", "checked (re-hash if changed)"), ("store, no check", "no check"),
                        ("store, full re-hash", "every chunk re-hashed")):
        print(f"load, from the store, {label + ':':<30} {best[name]:.3f} s   {best[name] / base:.2f}x")
    print(f"same logits from both loads: {same}")


if __name__ == "__main__":
    main()
