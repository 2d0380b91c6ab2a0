"""The declarative intervention spec: what to read and write during a forward pass.

A spec is plain typed data (JSON both ways), so shared replicas never run
a caller's code. Each step acts at a **point**: a module path in the
model's own module tree plus which side of the module, e.g.

- ``model.layers.4`` (the residual stream after layer 4; ``.output`` is implied),
- ``model.layers.4.mlp.input``,
- ``model.layers.4.self_attn.heads[3]`` (head 3's output, before the output projection),
- ``model.layers.4.self_attn.heads[*]`` (every head of that layer).

A module that returns a tuple (attention does) is read and written at its
first element, the hidden states. ``positions`` index each prompt's own
tokens (negative counts from the end); ``prompts`` picks which prompts of
the request a step touches. With ``generated=True`` an edit also applies to
every generated token (a save then also records one row per generated token).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpm_fed.protocol.tensors import TensorData

_POINT = re.compile(
    r"^(?P<module>[A-Za-z_][\w]*(?:\.[\w]+)*?)"
    r"(?:\.heads\[(?P<head>\d+|\*)\])?"
    r"(?:\.(?P<side>input|output))?$"
)


@dataclass(frozen=True)
class Point:
    """A parsed point address.

    Attributes:
        module: Dotted module path, e.g. ``model.layers.4.self_attn``.
        head: A head index, ``"*"`` for every head, or None for the whole module.
        side: ``input`` or ``output`` of the module (heads are always outputs).
    """

    module: str
    head: int | Literal["*"] | None
    side: Literal["input", "output"]

    @classmethod
    def parse(cls, text: str) -> Point:
        match = _POINT.match(text.strip())
        if match is None:
            raise ValueError(
                f"point {text!r} is not MODULE.PATH[.heads[N|*]][.input|.output], e.g. model.layers.4.output"
            )
        head = match["head"]
        if head is not None and match["side"] == "input":
            raise ValueError(f"point {text!r}: a head is an output; drop '.input'")
        return cls(
            module=match["module"],
            head=None if head is None else ("*" if head == "*" else int(head)),
            side=match["side"] or "output",  # type: ignore[arg-type]
        )

    def __str__(self) -> str:
        if self.head is not None:
            return f"{self.module}.heads[{self.head}]"
        return f"{self.module}.{self.side}"


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    point: str
    positions: list[int] | None = Field(default=None, min_length=1)
    prompts: list[int] | None = Field(default=None, min_length=1)
    generated: bool = False

    @field_validator("point")
    @classmethod
    def _parsable(cls, point: str) -> str:
        return str(Point.parse(point))

    @field_validator("prompts")
    @classmethod
    def _non_negative(cls, prompts: list[int] | None) -> list[int] | None:
        if prompts is not None and any(p < 0 for p in prompts):
            raise ValueError("prompt indexes count from 0")
        return prompts

    @property
    def address(self) -> Point:
        return Point.parse(self.point)


Axis = Literal["positions", "heads", "features"]


class Reduce(BaseModel):
    """A reduction the worker applies to a saved tensor, so only what is needed moves.

    A saved tensor is ``[positions, *features]`` (``heads[*]``: ``[positions,
    heads, head width]``). ``mean``, ``max`` and ``norm`` (L2) remove one axis:
    ``over`` positions by default (``norm``: features); ``heads`` exists only
    at a ``heads[*]`` point. ``project`` contracts the feature axis with the
    rows of ``vectors`` (``[k, features]``): ``[positions, ..., k]``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    op: Literal["mean", "max", "norm", "project"]
    over: Axis | None = None
    vectors: TensorData | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Reduce:
        if (self.op == "project") != (self.vectors is not None):
            raise ValueError("reduce: 'project' needs vectors, and only 'project' takes them")
        if self.op == "project" and self.over not in (None, "features"):
            raise ValueError(f"reduce: 'project' contracts the features; it cannot be over {self.over}")
        if self.vectors is not None and len(self.vectors.shape) != 2:
            raise ValueError(f"reduce: vectors must be [k, features]; got shape {list(self.vectors.shape)}")
        return self

    @property
    def axis(self) -> Axis:
        return self.over or ("positions" if self.op in ("mean", "max") else "features")

    def dim(self, ndim: int) -> int:
        """Which dimension of a ``ndim``-dimensional saved tensor the reduction acts on."""
        return {"positions": 0, "heads": 1, "features": ndim - 1}[self.axis]

    def shape(self, saved: tuple[int, ...]) -> tuple[int, ...]:
        """The reduced shape of a saved tensor of shape ``saved``."""
        if self.op == "project":
            return (*saved[:-1], self.vectors.shape[0])
        dim = self.dim(len(saved))
        return saved[:dim] + saved[dim + 1:]


class Save(_Step):
    """Return the tensor at the point (``name`` keys it in the result; the point by default).

    With ``reduce``, the worker returns the reduction instead of the tensor.
    """

    op: Literal["save"] = "save"
    name: str | None = Field(default=None, pattern=r"^[\w.\[\]*:-]+$")
    reduce: Reduce | None = None

    @property
    def key(self) -> str:
        return self.name or self.point


class SavedTerm(BaseModel):
    """``weight`` times what save ``save`` of session step ``step`` kept for ``prompt``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    step: str = Field(pattern=r"^[\w-]{1,64}$")
    save: str = Field(pattern=r"^[\w.\[\]*:-]+$")
    prompt: int = Field(default=0, ge=0)
    weight: float = 1.0


class FromSaved(BaseModel):
    """A value computed on the replica from earlier session steps: the weighted sum of saved tensors.

    A steering vector from two prompts is ``[{step, save, prompt: 0}, {step, save,
    prompt: 1, weight: -1}]``; a patch from another step is one term. Only a
    session (:class:`~tpm_fed.protocol.sessions.SessionRequest`) has earlier steps.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    terms: list[SavedTerm] = Field(min_length=1, max_length=16)


class _Valued(_Step):
    value: TensorData | None = None
    value_from: FromSaved | None = None

    @model_validator(mode="after")
    def _one_value(self) -> _Valued:
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"{self.op}: give value (a tensor) or value_from (saved by an earlier session step)")
        return self


class Set(_Valued):
    """Replace the tensor: ``value`` is one position's features, or one row per position."""

    op: Literal["set"] = "set"


class Add(_Valued):
    """Add ``value`` (e.g. a steering vector), shaped as for :class:`Set`."""

    op: Literal["add"] = "add"


class Scale(_Step):
    """Multiply the tensor by ``factor``."""

    op: Literal["scale"] = "scale"
    factor: float

    @field_validator("factor")
    @classmethod
    def _finite(cls, factor: float) -> float:
        if not math.isfinite(factor):
            raise ValueError("factor must be finite")
        return factor


class Ablate(_Step):
    """Zero the tensor (at a head point: zero-ablate that head)."""

    op: Literal["ablate"] = "ablate"


class Patch(_Step):
    """Copy the activation of prompt ``source`` (same request) into the target prompts.

    ``source_positions`` default to ``positions``; both count in each prompt's own tokens.
    Target prompts default to every prompt but the source.
    """

    op: Literal["patch"] = "patch"
    source: int = Field(ge=0)
    source_positions: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> Patch:
        if self.source_positions is not None and self.positions is not None:
            if len(self.source_positions) != len(self.positions):
                raise ValueError("source_positions and positions must have the same length")
        return self


class Inject(_Step):
    """Memory injection (Sakarvadia et al. 2023): add the summed embeddings of ``text`` times ``scale``."""

    op: Literal["inject"] = "inject"
    text: str = Field(min_length=1)
    scale: float = 1.0


Step = Annotated[Save | Set | Add | Scale | Ablate | Patch | Inject, Field(discriminator="op")]


class LogitLens(BaseModel):
    """Final norm + unembedding applied to each layer's residual stream.

    Attributes:
        layers: Layer indexes (every layer by default).
        positions: Token positions (every position by default).
        top_k: Tokens kept per layer and position.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    layers: list[int] | None = Field(default=None, min_length=1)
    positions: list[int] | None = Field(default=None, min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)


class AttentionLens(BaseModel):
    """Each head's contribution to the residual stream, projected to the vocabulary.

    Attributes:
        layers: Layer indexes (every layer by default).
        heads: Head indexes (every head by default).
        positions: Token positions (the last one by default).
        top_k: Tokens kept per layer, head and position.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    layers: list[int] | None = Field(default=None, min_length=1)
    heads: list[int] | None = Field(default=None, min_length=1)
    positions: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)


class AttentionPatterns(BaseModel):
    """Attention weights (heads x query x key) of the chosen layers."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    layers: list[int] | None = Field(default=None, min_length=1)
