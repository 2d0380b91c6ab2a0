"""The allow-listed architectures user adapters may have on shared replicas.

An adapter is a stack of layers from this short list, so a replica builds
it from our code (:mod:`functions.adapters.build`) and loads only its
weights (safetensors), never a pickle. This module describes the layers and
the tensors each holds without importing torch.
The stack's parameters are named as ``torch.nn.Sequential`` names them
(``0.weight``, ``2.bias``...), so weights saved from an equal
``nn.Sequential`` load as they are.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tpm_fed.protocol.errors import AdapterMismatch


class _Layer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """This layer's weights: name inside the layer -> shape (none for most layers)."""
        return {}


class Linear(_Layer):
    type: Literal["linear"] = "linear"
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = True

    def tensors(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_features, self.in_features), **({"bias": (self.out_features,)} if self.bias else {})}


class Conv1d(_Layer):
    """A 1-D convolution along the sequence (input and output are sequence x channels)."""

    type: Literal["conv1d"] = "conv1d"
    in_channels: int = Field(gt=0)
    out_channels: int = Field(gt=0)
    kernel_size: int = Field(gt=0)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        return {"conv.weight": (self.out_channels, self.in_channels, self.kernel_size), "conv.bias": (self.out_channels,)}


class LayerNorm(_Layer):
    type: Literal["layer_norm"] = "layer_norm"
    features: int = Field(gt=0)
    eps: float = Field(default=1e-5, gt=0)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.features,), "bias": (self.features,)}


class Activation(_Layer):
    type: Literal["activation"] = "activation"
    function: Literal["gelu", "relu", "silu", "tanh"]


class Unflatten(_Layer):
    """Split one vector into ``tokens`` embeddings (e.g. a fingerprint into a soft prompt)."""

    type: Literal["unflatten"] = "unflatten"
    tokens: int = Field(gt=0)


Layer = Annotated[Linear | Conv1d | LayerNorm | Activation | Unflatten, Field(discriminator="type")]


class Architecture(BaseModel):
    """A stack of allow-listed layers.

    Attributes:
        layers: Applied in order to the last dimension of the input.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[Layer] = Field(min_length=1)

    @property
    def in_features(self) -> int:
        first = self.layers[0]
        width = {"linear": "in_features", "conv1d": "in_channels", "layer_norm": "features"}.get(first.type)
        if width is None:
            raise AdapterMismatch("an adapter must start with a linear, conv1d or layer_norm layer")
        return getattr(first, width)

    @property
    def out_features(self) -> int:
        """Width of the output, checking each layer takes what the previous one gives.

        Raises:
            AdapterMismatch: Two consecutive layers disagree on the width between them.
        """
        width = self.in_features
        for index, layer in enumerate(self.layers):
            takes = {"linear": "in_features", "conv1d": "in_channels", "layer_norm": "features"}.get(layer.type)
            if takes and getattr(layer, takes) != width:
                raise AdapterMismatch(f"layer {index} ({layer.type}) takes {getattr(layer, takes)} features "
                                      f"but the layer before gives {width}")
            if layer.type == "linear":
                width = layer.out_features
            elif layer.type == "conv1d":
                width = layer.out_channels
            elif layer.type == "unflatten":
                if width % layer.tokens:
                    raise AdapterMismatch(f"layer {index} (unflatten) cannot split {width} features into "
                                          f"{layer.tokens} equal tokens")
                width //= layer.tokens
        return width

    @property
    def makes_sequence(self) -> bool:
        """True when the adapter turns one vector into several tokens (it unflattens)."""
        return any(layer.type == "unflatten" for layer in self.layers)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, as the weights file must hold them (``nn.Sequential`` names).

        Read off the layer descriptions, without torch; the worker builds the
        modules (:func:`functions.adapters.build.build_module`).
        """
        return {f"{index}.{name}": shape for index, layer in enumerate(self.layers)
                for name, shape in layer.tensors().items()}

    def check_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse weights that do not fit this architecture, naming every difference.

        Raises:
            AdapterMismatch: Missing, unexpected or misshapen tensors.
        """
        expected = self.expected_tensors()
        problems = [f"missing {name} {list(shape)}" for name, shape in expected.items() if name not in shapes]
        problems += [f"unexpected {name}" for name in shapes if name not in expected]
        problems += [
            f"{name} is {list(shapes[name])}, expected {list(shape)}"
            for name, shape in expected.items() if name in shapes and tuple(shapes[name]) != shape
        ]
        if problems:
            raise AdapterMismatch("adapter weights do not fit the architecture: " + "; ".join(problems))


