"""Make a small causal language model on this machine, in seconds.

Nothing can be fetched from a model hub here, so the embedded federation
serves a model made locally: a byte-level BPE tokenizer trained on the
shipped corpus (``corpus.txt``), and a 4-layer Llama briefly trained on the
same text so that its next-token distribution is sharp (greedy output is
readable and not decided by near-ties). It is saved with ``save_pretrained``
(safetensors), so replicas load it exactly as they would load a real model.

Everything is seeded; the folder appears only when complete.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ProgressFactory = Callable[..., object]


@dataclass(frozen=True)
class DemoModelRecipe:
    """Shape and training budget of the demo model.

    Attention heads are 32 wide: vLLM's CPU attention supports head sizes
    32 and up, and the same folder should serve on both backends.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    layers: int = 4
    heads: int = 4
    context: int = 256
    train_steps: int = 300
    batch_size: int = 16
    sequence_length: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def corpus_text() -> str:
    return resources.files("tpm_fed.models").joinpath("corpus.txt").read_text()


def make_demo_model(
    out_dir: Path, recipe: DemoModelRecipe = DemoModelRecipe(), *, progress: bool = True
) -> Path:
    """Train and save the demo model into ``out_dir`` (which must not exist).

    Returns:
        ``out_dir``, now a Hugging Face model directory.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    torch.manual_seed(recipe.seed)
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    tokenizer = _train_tokenizer(lines, recipe.vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)

    # One long stream of sentences, each ended by EOS, cut into training windows.
    stream: list[int] = []
    for line in lines:
        stream.extend(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.train_steps)
    model.train()
    steps = tqdm(range(recipe.train_steps), desc="training demo model", disable=not progress, unit="step")
    for _ in steps:
        starts = torch.randint(0, len(data) - recipe.sequence_length - 1, (recipe.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + recipe.sequence_length] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        steps.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()

    # Write beside the destination, then rename: a crash never leaves half a model.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".making-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _train_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
