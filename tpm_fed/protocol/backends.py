"""The backends' names: the one place they are written.

Apart from :mod:`tpm_fed.protocol.model` (which re-exports them) because
that module builds pydantic models, and the warm ``tpm submit`` lists the
choices of ``--backend`` without importing pydantic.
"""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["torch", "vllm", "encoder"]
"""The backends a worker serves with. ``encoder``: a sentence-transformers encoder
(functions/backends/encoder_backend.py), the one backend of ``encode``."""
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BackendChoice = Literal["auto", Backend]
"""What a model or a request may name: a backend, or ``auto`` (vLLM where it can, else torch)."""
