"""Tensors on the wire: dtype, shape and raw bytes, checked once where they enter.

Requests carry tensors (a steering vector, a replacement activation, a
user's input data) as :class:`TensorData`: JSON holds the bytes as base64,
so a request stays plain data. Results carry many tensors at once as one
safetensors blob (:func:`pack_tensors` / :func:`unpack_tensors`): compact,
typed, and never unpickled.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tpm_fed.protocol.dtypes import ITEM_BYTES, numpy_array, torch_dtype
from tpm_fed.protocol.safetensors_header import parse_header

FloatDType = Literal["float32", "float16", "bfloat16"]

TENSOR_HEADER_BYTES = 160
"""A generous share of the safetensors header per tensor in a result (for size bounds)."""


class TensorData(BaseModel):
    """A dense floating-point tensor given by the caller.

    Attributes:
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        shape: Its dimensions.
        data: Row-major little-endian bytes (base64 in JSON).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    dtype: FloatDType
    shape: tuple[int, ...] = Field(max_length=8)
    data: bytes

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        expected = ITEM_BYTES[self.dtype]
        for size in self.shape:
            if size <= 0:
                raise ValueError(f"tensor shape {list(self.shape)} has an empty dimension")
            expected *= size
        if len(self.data) != expected:
            raise ValueError(
                f"tensor of shape {list(self.shape)} and dtype {self.dtype} needs {expected} bytes, got {len(self.data)}"
            )
        if not _all_finite(self):
            raise ValueError("tensor holds NaN or infinite values")
        return self

    @classmethod
    def of(cls, value: Any) -> Self:
        """From a numpy array, a torch tensor or nested lists of floats.

        Raises:
            ValueError: Not floating point, or not a dtype listed above.
        """
        array = _as_numpy(value)
        if array.dtype.kind != "f":
            raise ValueError(f"tensor dtype {array.dtype} is not floating point (use float32, float16 or bfloat16)")
        if array.dtype.name not in ("float32", "float16"):
            raise ValueError(f"tensor dtype {array.dtype.name} is not accepted (use float32, float16 or bfloat16)")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return cls(dtype=array.dtype.name, shape=tuple(array.shape), data=array.tobytes(order="C"))

    def numpy(self):
        """As a numpy array (bfloat16 is widened to float32: numpy has no bfloat16)."""
        return numpy_array(self.data, self.dtype).reshape(self.shape)

    def torch(self):
        """As a torch tensor in its own dtype (imports torch)."""
        import torch

        return torch.frombuffer(bytearray(self.data), dtype=torch_dtype(self.dtype)).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def _as_numpy(value: Any):
    import numpy as np

    if type(value).__module__.startswith("torch"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.contiguous().numpy()
    return np.asarray(value, dtype=None if hasattr(value, "dtype") else np.float32)


def _all_finite(tensor: TensorData) -> bool:
    import numpy as np

    return bool(np.isfinite(tensor.numpy()).all())


def pack_tensors(tensors: dict[str, Any]) -> bytes:
    """Named torch tensors as one safetensors blob (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def unpack_tensors(blob: bytes) -> dict[str, Any]:
    """A safetensors blob as named numpy arrays (bfloat16 is widened to float32)."""
    if not blob:
        return {}
    from safetensors.numpy import load

    try:
        return load(blob)
    except Exception:  # numpy cannot hold bfloat16: go through torch
        from safetensors.torch import load as load_torch

        return {name: t.float().numpy() for name, t in load_torch(blob).items()}


def describe_tensors(blob: bytes) -> dict[str, dict[str, Any]]:
    """Name -> dtype (safetensors code) and shape of a blob, read from its header alone.

    Raises:
        SafetensorsFormatError: Not a well-formed safetensors blob.
    """
    if not blob:
        return {}
    entries, _ = parse_header(blob)
    return {e.name: {"dtype": e.dtype, "shape": list(e.shape)} for e in entries}

