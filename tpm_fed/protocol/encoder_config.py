"""How an encoder model folder says it turns token states into one vector (sentence-transformers layout).

A sentence-transformers folder lists its modules in ``modules.json``: the
transformer itself (path ``""``), then a ``Pooling`` module whose folder's
``config.json`` names the pooling, optionally a ``Normalize`` module (L2, no
files of its own). ``sentence_bert_config.json`` holds the sequence limit the
model was trained for. Both the service (context and dimension checks, at the
edge) and the worker (the pooling itself) read the folder through
:func:`read_encoder_config`, so they cannot disagree; torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tpm_fed.protocol.errors import ModelLoadError

PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]

POOLING_KEYS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
"""Older folders' one-flag-per-mode keys, in the order sentence-transformers concatenates the modes."""

MODULE_TYPES = {"Transformer", "Pooling", "Normalize"}
"""The module types served; a folder with another (a Dense projection...) is refused at load, by name."""


class EncoderConfig(BaseModel):
    """What the folder says about its encoder.

    Attributes:
        pooling: Modes whose pooled vectors are concatenated, in order.
        normalize: Rows are L2-normalized (a ``Normalize`` module follows the pooling).
        max_tokens: Tokens one text may have, special tokens included (longer texts are refused,
            never cut).
        dimensions: Length of each returned vector.
        module_paths: The folders of the modules (``1_Pooling``...), whose files define the model too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pooling: tuple[PoolingMode, ...]
    normalize: bool
    max_tokens: int
    dimensions: int
    module_paths: tuple[str, ...] = ()

    def describe(self) -> str:
        """``mean of token states, L2-normalized``: what a caller is told the vectors are."""
        modes = " + ".join(self.pooling)
        return f"{modes} pooling of token states" + (", L2-normalized" if self.normalize else "")


def is_encoder_folder(folder: Path) -> bool:
    """Whether ``folder`` is laid out as a sentence-transformers encoder."""
    return (folder / "modules.json").is_file()


def read_encoder_config(folder: Path, name: str = "") -> EncoderConfig:
    """Read the pooling, normalization and limits of the encoder in ``folder``.

    Raises:
        ModelLoadError: No ``modules.json``, a module type that is not served, or unreadable configs.
    """
    label = f"model {name!r}" if name else str(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        model = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{label}: not a sentence-transformers encoder folder ({error})") from None
    pooling: tuple[PoolingMode, ...] | None = None
    normalize = False
    paths = []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in MODULE_TYPES:
            raise ModelLoadError(f"{label}: module {module.get('type')!r} in modules.json is not served "
                                 f"(served: {', '.join(sorted(MODULE_TYPES))})")
        path = str(module.get("path", ""))
        if path and (Path(path).is_absolute() or ".." in Path(path).parts):
            raise ModelLoadError(f"{label}: module path {path!r} leaves the model folder")
        if path:
            paths.append(path)
        if kind == "Pooling":
            pooling = _pooling_modes(folder / path / "config.json", label)
        elif kind == "Normalize":
            normalize = True
    if pooling is None:
        raise ModelLoadError(f"{label}: modules.json has no Pooling module")
    return EncoderConfig(pooling=pooling, normalize=normalize, max_tokens=_max_tokens(folder, model),
                         dimensions=int(model["hidden_size"]) * len(pooling), module_paths=tuple(paths))


def _pooling_modes(config_file: Path, label: str) -> tuple[PoolingMode, ...]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{label}: cannot read the pooling config ({error})") from None
    if "pooling_mode" in config:  # the newer form: one mode, or a list of them
        asked = config["pooling_mode"]
        modes = tuple([asked] if isinstance(asked, str) else asked)
    else:
        modes = tuple(mode for key, mode in POOLING_KEYS.items() if config.get(key)) or ("mean",)
    unknown = [mode for mode in modes if mode not in POOLING_KEYS.values()]
    if unknown:
        raise ModelLoadError(f"{label}: pooling mode {unknown[0]!r} is not served")
    if config.get("include_prompt") is False:
        raise ModelLoadError(f"{label}: pooling that leaves out a prompt (include_prompt: false) is not served")
    return modes  # type: ignore[return-value]


def _max_tokens(folder: Path, model: dict) -> int:
    """The folder's own ``max_seq_length``, else the model's positions (what sentence-transformers uses too)."""
    positions = int(model.get("max_position_embeddings") or 0)
    try:
        limit = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError):
        limit = None
    if limit:
        return min(int(limit), positions) if positions else int(limit)
    return positions
