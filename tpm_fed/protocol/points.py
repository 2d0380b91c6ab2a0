"""Every hookable point of a model, with its shape: what specs are checked against.

The catalog is read off the model itself: a probe forward pass with a hook
on every module records which modules run and the shape of what goes in and
out. On the client the probe runs on the ``meta`` device, so it needs only
``config.json`` (no weights, no memory, a model of any size); a replica runs
the same probe on its real model, so both sides check a spec against the
same list.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tpm_fed.protocol.errors import InvalidRequest, UnknownPoint
from tpm_fed.protocol.interventions import Point

_PROBE_BATCH, _PROBE_SEQ = 2, 3
_OUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense")


class PointInfo(BaseModel):
    """One module side: its type and its features (the shape after batch and sequence)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module_type: str
    features: tuple[int, ...]


class AttentionInfo(BaseModel):
    """An attention module whose heads can be addressed one by one.

    Attributes:
        heads: Number of heads.
        head_dim: Width of one head's output.
        out_projection: The module whose input holds the heads side by side.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    heads: int
    head_dim: int
    out_projection: str


class PointCatalog(BaseModel):
    """The points of one model architecture.

    Attributes:
        points: ``MODULE.input`` / ``MODULE.output`` -> its info.
        attention: Attention module path -> its heads.
        layers: The decoder layers, in order (the residual stream is their output).
        embeddings: The token embedding module.
        final_norm: The norm applied before the unembedding (None if the model has none).
        unembedding: The output projection to the vocabulary.
        hidden_size: Width of the residual stream.
        vocab_size: Rows of the unembedding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    points: dict[str, PointInfo]
    attention: dict[str, AttentionInfo]
    layers: list[str]
    embeddings: str
    final_norm: str | None
    unembedding: str
    hidden_size: int
    vocab_size: int

    def features(self, point: Point) -> tuple[int, ...]:
        """The feature shape at ``point`` (``heads[*]``: heads x head width).

        Raises:
            UnknownPoint: No such module, side or head (the closest valid names are suggested).
        """
        if point.head is not None:
            info = self.attention.get(point.module)
            if info is None:
                raise UnknownPoint(self._unknown(str(point), [f"{name}.heads[0]" for name in self.attention]))
            if point.head != "*" and not 0 <= point.head < info.heads:
                raise UnknownPoint(
                    f"point {point}: head {point.head} is out of range; {point.module} has heads 0..{info.heads - 1}"
                )
            return (info.heads, info.head_dim) if point.head == "*" else (info.head_dim,)
        key = f"{point.module}.{point.side}"
        if key not in self.points:
            raise UnknownPoint(self._unknown(key, list(self.points)))
        return self.points[key].features

    def layer(self, index: int) -> str:
        """The path of decoder layer ``index`` (negative counts from the end)."""
        if not -len(self.layers) <= index < len(self.layers):
            raise InvalidRequest(f"layer {index} is out of range; the model has layers 0..{len(self.layers) - 1}")
        return self.layers[index]

    def attention_of(self, layer: int) -> tuple[str, AttentionInfo]:
        """The attention module inside decoder layer ``layer``."""
        prefix = self.layer(layer) + "."
        for name, info in self.attention.items():
            if name.startswith(prefix):
                return name, info
        raise InvalidRequest(f"layer {layer} has no attention module with addressable heads")

    def describe(self) -> list[tuple[str, str, str]]:
        """(point, module type, features) rows in model order, heads after their module."""
        rows: list[tuple[str, str, str]] = []
        for key, info in self.points.items():
            rows.append((key, info.module_type, "x".join(map(str, info.features))))
            module = key.rsplit(".", 1)[0]
            if key.endswith(".output") and module in self.attention:
                heads = self.attention[module]
                rows.append((f"{module}.heads[0..{heads.heads - 1}]", "head", str(heads.head_dim)))
        return rows

    @staticmethod
    def _unknown(name: str, valid: list[str]) -> str:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        return f"unknown point {name!r}{hint} (`tpm models inspect` lists every point)"


def probe_points(model: Any) -> PointCatalog:
    """Run a 2 x 3-token probe through ``model`` (real or on ``meta``) and list its points."""
    import torch

    names = {id(module): name for name, module in model.named_modules()}
    seen: dict[str, PointInfo] = {}
    order: list[str] = []

    def record(module, args, kwargs, output):
        name = names[id(module)]
        for side, value in (("input", _first_tensor(args, kwargs)), ("output", _first_tensor((output,), {}))):
            if (value is not None and name and value.is_floating_point()
                    and tuple(value.shape[:2]) == (_PROBE_BATCH, _PROBE_SEQ)):
                seen.setdefault(f"{name}.{side}", PointInfo(module_type=type(module).__name__,
                                                            features=tuple(value.shape[2:])))
        order.append(name)

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in model.modules()]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros(_PROBE_BATCH, _PROBE_SEQ, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()

    config = model.config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    attention = {}
    for name, module in model.named_modules():
        if "Attention" in type(module).__name__:
            for child in _OUT_PROJECTIONS:
                if f"{name}.{child}.input" in seen and seen[f"{name}.{child}.input"].features == (heads * head_dim,):
                    attention[name] = AttentionInfo(heads=heads, head_dim=head_dim, out_projection=f"{name}.{child}")
                    break
    layers = _decoder_layers(model, names, attention)
    unembedding = names[id(model.get_output_embeddings())]
    ran = [name for name in order if name]
    before_unembedding = ran[: ran.index(unembedding)] if unembedding in ran else ran
    final_norm = next((n for n in reversed(before_unembedding) if "Norm" in type(model.get_submodule(n)).__name__
                       and not any(n.startswith(layer + ".") for layer in layers)), None)
    return PointCatalog(
        points={key: seen[key] for key in _model_order(seen, names)},
        attention=attention,
        layers=layers,
        embeddings=names[id(model.get_input_embeddings())],
        final_norm=final_norm,
        unembedding=unembedding,
        hidden_size=hidden,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
    )


def catalog_from_config(model_dir: Path | str | None, config: dict | None = None) -> PointCatalog:
    """The catalog of an architecture, probed on ``meta`` (no weights read).

    Args:
        model_dir: A Hugging Face model folder, or None when ``config`` is given.
        config: The contents of a ``config.json``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        hf_config = AutoConfig.from_pretrained(model_dir)
    else:
        hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return probe_points(model.eval())


def _first_tensor(args: tuple, kwargs: dict):
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, tuple) and value and torch.is_tensor(value[0]):
            return value[0]
        if torch.is_tensor(value):
            return value
    return None


def _decoder_layers(model: Any, names: dict[int, str], attention: dict) -> list[str]:
    import torch

    best: list[str] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            paths = [names[id(child)] for child in module]
            if paths and all(any(a.startswith(p + ".") for a in attention) for p in paths) and len(paths) > len(best):
                best = paths
    return best


def _model_order(seen: dict[str, PointInfo], names: dict[int, str]) -> list[str]:
    rank = {name: i for i, name in enumerate(names.values())}
    return sorted(seen, key=lambda key: (rank.get(key.rsplit(".", 1)[0], 0), key.endswith(".output")))
