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
    Reduce,
    Save,
    Scale,
    Set,
)

__all__ = [
    "Ablate", "Add", "AttentionLens", "AttentionPatterns", "Inject", "LogitLens", "Patch", "Point",
    "PythonHook", "Reduce", "Save", "Scale", "Set", "TraceRequest",
]
