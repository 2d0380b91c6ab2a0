"""Inference mode 2: user input modules and output heads around the shared core."""

from tpm_fed.adapters.architecture import Activation, Architecture, Conv1d, LayerNorm, Linear, Unflatten
from tpm_fed.adapters.registry import AdapterRecord, AdapterRegistry
from tpm_fed.adapters.request import EmbeddingRequest

__all__ = [
    "Activation", "AdapterRecord", "AdapterRegistry", "Architecture", "Conv1d", "EmbeddingRequest",
    "LayerNorm", "Linear", "Unflatten",
]
