"""Inference mode 3: read and write activations during the forward pass."""

from tpm_fed.protocol.requests import PythonHook, TraceRequest
from tpm_fed.protocol.interventions import (
    Ablate,
    Add,
    AttentionLens,
    AttentionPatterns,
    Inject,
    LogitLens,
    Patch,
    Point,
    Save,
    Scale,
    Set,
)

__all__ = [
    "Ablate", "Add", "AttentionLens", "AttentionPatterns", "Inject", "LogitLens", "Patch", "Point",
    "PythonHook", "Save", "Scale", "Set", "TraceRequest",
]
