"""The torch backend's oracles on a chosen device (a GPU where the machine has one).

Runs the worker's own serving function (``functions.serve.serve_batch``, as an
endpoint does) with ``TPM_TORCH_DEVICE`` set, and checks each kind against the
same computation written by hand with transformers on the same device:

- ``generate``: greedy tokens equal ``model.generate`` called directly, token for token;
- ``trace``: saved activations and the logit lens equal forward hooks by hand;
  a patch changes the output exactly as a hand-written patch;
- ``embed``: final hidden states of texts equal the base model's by hand.

It also prints how far the device's float32 results are from the CPU's (a
reading, not a check: kernels differ). Exits 1 when a check fails.

    python scripts/check_torch_device.py MODEL_DIR --device cuda
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

PROMPTS = ["The cell divides", "The telescope observed the", "Proteins fold into"]
POINT = "model.layers.1"
TOLERANCE = 1e-5


def _served(spec: dict, requests: list[dict]) -> list[dict]:
    from functions.serve import serve_batch

    reply = serve_batch(spec, requests, {})
    for outcome in reply["outcomes"]:
        if "result" not in outcome:
            raise RuntimeError(f"the worker refused: {outcome}")
    return [outcome["result"] for outcome in reply["outcomes"]]


def _tensors(result: dict) -> dict:
    from tpm_fed.protocol.tensors import unpack_tensors

    return unpack_tensors(base64.urlsafe_b64decode(result["tensors_blob"]))


def run_checks(model_dir: Path, device: str) -> list[tuple[str, bool, str]]:
    """Each check's name, whether it held, and what was compared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpm_fed.interventions import LogitLens, Patch, Save, TraceRequest
    from tpm_fed.protocol.requests import EmbeddingRequest, GenerationRequest
    from tpm_fed.protocol.versions import hash_model_dir

    os.environ["TPM_TORCH_DEVICE"] = device
    spec = {"name": "checked", "version": hash_model_dir(model_dir), "path": str(model_dir), "backend": "torch"}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    checks: list[tuple[str, bool, str]] = []

    # generate: one prompt per request, so no padding on either side.
    served = _served(spec, [GenerationRequest.create(p, "checked", max_new_tokens=24).to_wire() for p in PROMPTS])
    for prompt, result in zip(PROMPTS, served, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        with torch.inference_mode():
            direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        direct_text = tokenizer.decode(direct.tolist(), skip_special_tokens=True)
        got = result["completions"][0]["text"]
        checks.append((f"generate {prompt!r}", got == direct_text,
                       f"served {got!r} vs direct {direct_text!r}"))

    # trace: save a layer's output and the logit lens, against hooks by hand.
    prompt = PROMPTS[1]
    trace = TraceRequest.create("checked", prompts=[prompt], steps=[Save(point=POINT)], logit_lens=LogitLens(top_k=5))
    saved = _tensors(_served(spec, [trace.to_wire()])[0])
    captured = {}
    handle = model.get_submodule(POINT).register_forward_hook(
        lambda m, a, out: captured.__setitem__("out", (out[0] if isinstance(out, tuple) else out).detach()))
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    with torch.inference_mode():
        model(input_ids=ids)
        lens = torch.softmax(model.lm_head(model.model.norm(captured["out"][0])), dim=-1).topk(5)
    handle.remove()
    by_hand = captured["out"][0].cpu()
    activation = torch.from_numpy(saved[f"0:{POINT}.output"])
    diff = (activation - by_hand).abs().max().item()
    checks.append((f"trace save {POINT}", diff <= TOLERANCE, f"max abs diff {diff:.2e}"))
    layer = int(POINT.rsplit(".", 1)[1])
    same_ids = bool((torch.from_numpy(saved["0:logit_lens.ids"][layer]).long() == lens.indices.cpu()).all())
    probs_diff = (torch.from_numpy(saved["0:logit_lens.probs"][layer]) - lens.values.cpu()).abs().max().item()
    checks.append(("trace logit lens", same_ids and probs_diff <= TOLERANCE,
                   f"top-5 ids equal: {same_ids}, max abs prob diff {probs_diff:.2e}"))

    # a patch from prompt 0 into prompt 1 at two positions, against a hand-written patch.
    clean, corrupt = "The cell divides and the", "The star divides and the"
    patched = _tensors(_served(spec, [TraceRequest.create(
        "checked", prompts=[clean, corrupt],
        steps=[Patch(point=POINT, source=0, positions=[1, 2]), Save(point="lm_head", prompts=[1])]).to_wire()])[0])

    def patch(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[1, [1, 2]] = hidden[0, [1, 2]]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.get_submodule(POINT).register_forward_hook(patch)
    pair = torch.tensor([tokenizer(clean)["input_ids"], tokenizer(corrupt)["input_ids"]], device=device)
    with torch.inference_mode():
        logits = model(input_ids=pair).logits[1].cpu()
    handle.remove()
    diff = (torch.from_numpy(patched["1:lm_head.output"]) - logits).abs().max().item()
    checks.append(("trace patch", diff <= TOLERANCE, f"max abs diff {diff:.2e}"))

    # embed: texts through the core, pooled by mean, against the base model by hand.
    embedded = _tensors(_served(spec, [EmbeddingRequest.create("checked", texts=PROMPTS, pool="mean").to_wire()])[0])
    worst = 0.0
    for index, text in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
        with torch.inference_mode():
            by_hand = model.model(input_ids=ids).last_hidden_state[0].mean(dim=0).cpu()
        worst = max(worst, (torch.from_numpy(embedded[str(index)]) - by_hand).abs().max().item())
    checks.append(("embed texts (mean)", worst <= TOLERANCE, f"max abs diff {worst:.2e}"))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (TPM_TORCH_DEVICE)")
    args = parser.parse_args()
    import torch

    from functions.backends.device import resolve_device

    device = str(resolve_device(args.device))
    started = time.perf_counter()
    checks = run_checks(args.model_dir.resolve(), device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {time.perf_counter() - started:.1f} s")
    for check, held, detail in checks:
        print(f"{'ok  ' if held else 'FAIL'} {check}: {detail}")
    return 0 if all(held for _, held, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
