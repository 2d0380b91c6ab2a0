"""The encoder backend: a sentence-transformers folder served with transformers alone.

The folder's transformer (``AutoModel``: BERT, MiniLM...) gives token states;
its own ``Pooling`` and ``Normalize`` modules, read from the folder
(:func:`tpm_fed.protocol.encoder_config.read_encoder_config`), make them one
vector per text, as ``SentenceTransformer.encode`` does on the same folder.
sentence-transformers itself is not needed here: it would only add a second
way of reading the same files. Texts are never truncated; the handler refuses
one over :attr:`EncoderBackend.context_length` before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tpm_fed.protocol.encoder_config import EncoderConfig, read_encoder_config
from tpm_fed.protocol.errors import ModelLoadError
from tpm_fed.protocol.model import ModelSpec

BATCH_SIZE = 32
"""Texts per forward pass: sentence-transformers' default, with texts sorted by length as it sorts them,
so each pass pads little."""


class EncoderBackend:
    """A loaded encoder; has the ``encode`` capability only.

    Attributes:
        context_length: Tokens one text may have (the folder's ``max_seq_length``).
    """

    name = "encoder"

    def __init__(self, model: Any, tokenizer: Any, config: EncoderConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.context_length = config.max_tokens
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, spec: ModelSpec) -> EncoderBackend:
        """Load the transformer (safetensors only), its tokenizer and its pooling from ``spec.path``.

        Raises:
            ModelLoadError: Not an encoder folder, a module that is not served, or unloadable weights.
        """
        import torch
        from transformers import AutoModel, AutoTokenizer

        if spec.source == "store":
            raise ModelLoadError(f"model {spec.name!r}: encoder models are served from their folder "
                                 "(modules.json and its module folders), not from the model store")
        path = Path(spec.path)
        config = read_encoder_config(path, spec.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=getattr(torch, spec.dtype), use_safetensors=True)
        except Exception as error:  # transformers raises many types for bad files
            raise ModelLoadError(f"model {spec.name!r}: could not load {path}: {type(error).__name__}: {error}") from None
        model.eval()
        return cls(model, tokenizer, config)

    def close(self) -> None:
        self.model = None

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included, uncut (the caller checks the context)."""
        return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.token_ids(texts)]

    def encode_texts(self, texts: list[str]) -> Any:
        return self.encode_ids(self.token_ids(texts))

    def encode_ids(self, ids: list[list[int]]) -> Any:
        """``[len(ids), dimensions]`` float32 vectors, in order: longest first in batches of :data:`BATCH_SIZE`."""
        import numpy as np
        import torch

        out = np.empty((len(ids), self.config.dimensions), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start:start + BATCH_SIZE]
                out[rows] = self._forward([ids[i] for i in rows]).numpy()
        return out

    def _forward(self, batch: list[list[int]]) -> Any:
        import torch

        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        states = self.model(input_ids=input_ids, attention_mask=mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        vectors = torch.cat([pool(mode, states, mask) for mode in self.config.pooling], dim=-1)
        if self.config.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.float()


def pool(mode: str, states: Any, mask: Any) -> Any:
    """One pooling mode over right-padded ``states`` ``[batch, tokens, hidden]``, as sentence-transformers' ``Pooling``."""
    import torch

    weights = mask.unsqueeze(-1).to(states.dtype)
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        return states.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (states * weights).sum(dim=1)
        count = torch.clamp(weights.sum(dim=1), min=1e-9)
        return total / (count if mode == "mean" else torch.sqrt(count))
    if mode == "weightedmean":
        positions = torch.arange(1, states.shape[1] + 1, dtype=states.dtype).view(1, -1, 1) * weights
        return (states * positions).sum(dim=1) / torch.clamp(positions.sum(dim=1), min=1e-9)
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0]), last]
    raise ValueError(f"pooling mode {mode!r} is not served")
