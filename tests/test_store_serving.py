"""Models served from the model store answer with the same tokens as the model itself.

Most small open models tie their output embedding to the input embedding
(``tie_word_embeddings``): the saved weights hold no ``lm_head.weight``, so
neither does the store. Such a model, and a bfloat16 one, made here, go
through the whole path: imported into the store, served by a runtime's
worker from the store, compared token for token with ``model.generate``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.store import ModelStore

PROMPTS = ["The telescope", "A quiet river runs", "Stars"]


def tied_model(demo_model_dir: Path, out: Path) -> Path:
    """A fresh model shaped like the demo model, with its output embedding tied to its input."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(demo_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(7)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    for file in demo_model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, out)
    return out


@pytest.fixture(scope="module")
def store_home(tmp_path_factory, demo_model_dir):
    root = tmp_path_factory.mktemp("store-home")
    home = TpmHome(root)
    tied = tied_model(demo_model_dir, root / "made" / "tied")
    store = ModelStore(root / "store")
    tied_version = store.import_dir(tied, "tied")
    assert "lm_head.weight" not in store.manifest(tied_version).tensors  # what made the old load fail
    Federation(
        name="store-serving",
        sites=[SiteConfig(name="local")],
        models=[
            ModelConfig(name="tied", store=True, backend="torch"),
            ModelConfig(name="tied-bf16", store=True, backend="torch", dtype="bfloat16"),
        ],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    # The same stored version, once under a name served in bfloat16.
    store.import_dir(tied, "tied-bf16")
    return home, tied


def expected_tokens(folder: Path, dtype: str, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name,dtype", [("tied", "float32"), ("tied-bf16", "bfloat16")])
def test_a_tied_embedding_model_served_from_the_store_equals_model_generate(store_home, name, dtype):
    from tpm_fed.service.runtime import Runtime

    home, folder = store_home
    with Runtime(home) as runtime:
        for prompt in PROMPTS:
            result = runtime.generate(prompt, name, max_new_tokens=12, min_new_tokens=12).result(timeout=300)
            assert result.completions[0].token_ids == expected_tokens(folder, dtype, prompt, 12), prompt
