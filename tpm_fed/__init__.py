"""tpm-fed: federated access to large AI models over Globus Compute.

Importing this package never imports torch or vllm; those load inside
endpoint workers (see :mod:`functions`).
"""

from tpm_fed.client import Client
from tpm_fed.executor import Executor
from tpm_fed.protocol.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
    RemoteExecutionError,
    SiteError,
    TpmError,
    UnknownModel,
    UnknownVersion,
)
from tpm_fed.protocol.requests import GenerationRequest, ModelRef
from tpm_fed.protocol.results import GenerationResult

__all__ = [
    "Client",
    "Executor",
    "ContextLengthExceeded",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequest",
    "ModelLoadError",
    "ModelRef",
    "RemoteExecutionError",
    "SiteError",
    "TpmError",
    "UnknownModel",
    "UnknownVersion",
]
