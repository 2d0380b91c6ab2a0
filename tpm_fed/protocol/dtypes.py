"""Tensor element types, named once: the model config's name, the safetensors code, the byte size.

A model's ``dtype`` setting, a tensor on the wire and numpy use one set of
names (``float32``, ``bfloat16``, ``float16``...); a safetensors header uses
its own codes (``F32``, ``BF16``, ``F16``...). This table ties each name to
its code and its size in bytes. The torch dtype of each is looked up on
first use (:func:`torch_dtype`), so the contract imports no torch; the
store's operator tools and the worker's store loader share that lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class ElementType:
    """One element type.

    Attributes:
        name: As the model config, torch and numpy name it (``bfloat16``).
        code: As a safetensors header writes it (``BF16``).
        itemsize: Bytes per element.
    """

    name: str
    code: str
    itemsize: int


DTYPES = (
    ElementType("bool", "BOOL", 1),
    ElementType("uint8", "U8", 1),
    ElementType("int8", "I8", 1),
    ElementType("float8_e4m3fn", "F8_E4M3", 1),
    ElementType("float8_e5m2", "F8_E5M2", 1),
    ElementType("int16", "I16", 2),
    ElementType("uint16", "U16", 2),
    ElementType("float16", "F16", 2),
    ElementType("bfloat16", "BF16", 2),
    ElementType("int32", "I32", 4),
    ElementType("uint32", "U32", 4),
    ElementType("float32", "F32", 4),
    ElementType("int64", "I64", 8),
    ElementType("uint64", "U64", 8),
    ElementType("float64", "F64", 8),
)

BY_CODE = {d.code: d for d in DTYPES}
"""Safetensors code -> element type."""

BY_NAME = {d.name: d for d in DTYPES}
"""Name (``float32``...) -> element type."""

ITEM_BYTES = {d.name: d.itemsize for d in DTYPES}
"""Name -> bytes per element (``ITEM_BYTES["bfloat16"] == 2``)."""


def lookup(name_or_code: str) -> ElementType:
    """The element type for a name (``bfloat16``) or a safetensors code (``BF16``).

    Raises:
        KeyError: Neither.
    """
    found = BY_NAME.get(name_or_code) or BY_CODE.get(name_or_code)
    if found is None:
        raise KeyError(f"unknown dtype {name_or_code!r}")
    return found


@cache
def torch_dtype(name_or_code: str) -> Any:
    """The torch dtype for a name or a safetensors code (imports torch on first use)."""
    import torch

    return getattr(torch, lookup(name_or_code).name)


def numpy_array(data: bytes | bytearray | memoryview, name_or_code: str) -> Any:
    """Little-endian bytes as a flat numpy array (imports numpy).

    numpy has no bfloat16: those are widened to float32, exactly (a bfloat16
    is the top half of a float32).

    Raises:
        KeyError: An unknown dtype, or one numpy cannot hold (the float8 types).
    """
    import numpy as np

    dtype = lookup(name_or_code)
    if dtype.name == "bfloat16":
        halves = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32)
    if dtype.name.startswith("float8"):
        raise KeyError(f"numpy has no {dtype.name}")
    return np.frombuffer(data, dtype=np.dtype(dtype.name).newbyteorder("<"))
