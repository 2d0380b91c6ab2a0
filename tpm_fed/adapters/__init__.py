"""Inference mode 2: user input modules and output heads around the shared core."""

from tpm_fed.protocol.adapter_architecture import Activation, Architecture, Conv1d, LayerNorm, Linear, Unflatten
from tpm_fed.storage.adapter_registry import AdapterRecord, AdapterRegistry
from tpm_fed.protocol.requests import EmbeddingRequest

__all__ = [
    "Activation", "AdapterRecord", "AdapterRegistry", "Architecture", "Conv1d", "EmbeddingRequest",
    "LayerNorm", "Linear", "Unflatten",
]
