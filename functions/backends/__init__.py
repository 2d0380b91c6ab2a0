"""Backends: one file each, behind :class:`functions.backends.base.Backend`."""

from __future__ import annotations

from functions.backends.base import Backend
from tpm_fed.models.spec import ModelSpec


def load_backend(spec: ModelSpec) -> Backend:
    """Load the backend the spec names (imports it only when asked for)."""
    if spec.backend == "torch":
        from functions.backends.torch_backend import TorchBackend

        return TorchBackend.load(spec)
    raise ValueError(f"unknown backend {spec.backend!r}")
