"""Build the torch module of an allow-listed adapter architecture (worker side).

The contract (:mod:`tpm_fed.protocol.adapter_architecture`) describes the
layers and the tensors their weights must hold without torch; turning that
description into modules is the worker's job, so torch stays out of the
contract. Parameter names follow ``torch.nn.Sequential`` (``0.weight``...),
which is what :meth:`Architecture.expected_tensors` lists; a test holds the two equal.
"""

from __future__ import annotations

import torch

from tpm_fed.protocol.adapter_architecture import Architecture


class SequenceConv1d(torch.nn.Module):
    """Conv1d over a (sequence, channels) input; 'same' padding keeps the length."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(in_channels, out_channels, kernel_size, padding="same")

    def forward(self, x):
        return self.conv(x.transpose(-1, -2)).transpose(-1, -2)


_ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}


def build_module(architecture: Architecture) -> torch.nn.Sequential:
    """The adapter's modules, freshly initialized (load its weights next)."""
    modules: list[torch.nn.Module] = []
    for layer in architecture.layers:
        if layer.type == "linear":
            modules.append(torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
        elif layer.type == "conv1d":
            modules.append(SequenceConv1d(layer.in_channels, layer.out_channels, layer.kernel_size))
        elif layer.type == "layer_norm":
            modules.append(torch.nn.LayerNorm(layer.features, eps=layer.eps))
        elif layer.type == "activation":
            modules.append(_ACTIVATIONS[layer.function]())
        elif layer.type == "unflatten":
            modules.append(torch.nn.Unflatten(-1, (layer.tokens, -1)))
        else:  # a layer type added to the contract but not here
            raise NotImplementedError(f"no module for adapter layer type {layer.type!r}")
    return torch.nn.Sequential(*modules)
