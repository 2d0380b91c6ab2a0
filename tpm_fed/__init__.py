"""tpm-fed: federated access to large AI models over Globus Compute.

Importing this package never imports torch or vllm; those load inside
endpoint workers (see :mod:`functions`). Its public names load on first use
(PEP 562), so a ``tpm`` command pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Client": "tpm_fed.client",
    "Executor": "tpm_fed.executor",
    "ContextLengthExceeded": "tpm_fed.protocol.errors",
    "InvalidRequest": "tpm_fed.protocol.errors",
    "ModelLoadError": "tpm_fed.protocol.errors",
    "RemoteExecutionError": "tpm_fed.protocol.errors",
    "SiteError": "tpm_fed.protocol.errors",
    "TpmError": "tpm_fed.protocol.errors",
    "UnknownModel": "tpm_fed.protocol.errors",
    "UnknownVersion": "tpm_fed.protocol.errors",
    "GenerationRequest": "tpm_fed.protocol.requests",
    "ModelRef": "tpm_fed.protocol.requests",
    "GenerationResult": "tpm_fed.protocol.results",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tpm_fed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
