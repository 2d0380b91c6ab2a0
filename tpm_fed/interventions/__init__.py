"""Inference mode 3: read and write activations during the forward pass (and sessions of such traces)."""

from tpm_fed.protocol.requests import PythonHook, TraceRequest
from tpm_fed.protocol.sessions import SessionRequest, SessionStep
from tpm_fed.protocol.interventions import (
    Ablate,
    Add,
    AttentionLens,
    AttentionPatterns,
    FromSaved,
    Inject,
    LogitLens,
    Patch,
    Point,
    Reduce,
    Save,
    SavedTerm,
    Scale,
    Set,
)

__all__ = [
    "Ablate", "Add", "AttentionLens", "AttentionPatterns", "FromSaved", "Inject", "LogitLens", "Patch", "Point",
    "PythonHook", "Reduce", "Save", "SavedTerm", "Scale", "SessionRequest", "SessionStep", "Set", "TraceRequest",
]
