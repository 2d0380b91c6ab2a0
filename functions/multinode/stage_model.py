"""Build one stage's share of a model: the full module tree, but only this stage's weights.

The model is built on the ``meta`` device (no memory), then the tensors this
stage holds are read from the folder's safetensors files one by one
(``safe_open`` reads only what is asked for), so a rank never holds weights
another rank serves: what makes a model too large for one node servable.
Layers of other stages stay on ``meta``; rank 0 replaces them with the pipeline
that reaches the other ranks (:mod:`functions.multinode.pipeline`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from functions.multinode.stages import StagePlan
from tpm_fed.protocol.errors import BackendUnavailable, ModelLoadError
from tpm_fed.protocol.model import ModelSpec


def stage_plan(spec: ModelSpec, config: Any) -> StagePlan:
    """How ``spec``'s layers are cut into its ``pipeline_parallel_size`` stages."""
    if spec.tensor_parallel_size != 1:
        raise BackendUnavailable(
            f"model {spec.name!r}: the torch backend splits a replica into pipeline stages only; "
            f"tensor_parallel_size {spec.tensor_parallel_size} needs the vLLM backend")
    return StagePlan.even(int(config.num_hidden_layers), spec.pipeline_parallel_size)


def load_stage(spec: ModelSpec, stage: int) -> tuple[Any, StagePlan]:
    """The model with stage ``stage``'s weights loaded (others on ``meta``), and the plan.

    Raises:
        ModelLoadError: The folder is missing, not safetensors, or lacks a tensor this stage needs.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if spec.source != "dir":
        raise ModelLoadError(f"model {spec.name!r}: a split replica loads a model folder, not a store version")
    path = Path(spec.path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as error:
        raise ModelLoadError(f"model {spec.name!r}: cannot read the config in {path}: {type(error).__name__}") from None
    plan = stage_plan(spec, config)
    dtype = getattr(torch, spec.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    tensors: dict[str, Any] = {}
    for file in _weight_files(path, spec.name):
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                if plan.holds(stage, key):
                    tensor = weights.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(tensors, strict=False, assign=True)
    if stage == 0 and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the unembedding is the embedding: stored once, held by rank 0
    # Buffers computed at construction (rotary tables) were made on meta: make them again here.
    for name, module in list(model.named_modules()):
        if "RotaryEmbedding" in type(module).__name__:
            model.set_submodule(name, type(module)(config=config))
    missing = [name for name, parameter in model.named_parameters()
               if parameter.is_meta and plan.holds(stage, name)]
    if missing:
        raise ModelLoadError(f"model {spec.name!r}: stage {stage} needs tensors the folder lacks: {missing[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, plan


def _weight_files(path: Path, name: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"model {name!r}: {path} has no safetensors weights")
