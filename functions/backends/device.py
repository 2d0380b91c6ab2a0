"""Where the torch backend runs a model: the endpoint's ``TPM_TORCH_DEVICE`` (functions.policy).

``auto`` takes the first GPU torch sees, else the CPU, as vLLM does. A GPU the
operator names but torch cannot see is an error at load time: a model meant
for a GPU quietly served on the CPU would be 100 times slower and charged as
if it were not.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.errors import ModelLoadError


def resolve_device(setting: str) -> Any:
    """The ``torch.device`` for a policy's ``torch_device`` setting.

    Raises:
        ModelLoadError: A GPU is named and torch sees none (or not that one).
    """
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        index = device.index or 0
        if index >= visible:
            raise ModelLoadError(
                f"TPM_TORCH_DEVICE={setting}: torch sees {visible} GPU(s) on this worker "
                f"(torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available'})"
            )
    return device
