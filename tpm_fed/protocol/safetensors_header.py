"""Where each tensor's bytes lie in a safetensors file, read from its header.

The format is an 8-byte little-endian header length, a JSON header (tensor
name -> dtype, shape, data_offsets), then the data. Reading the header
ourselves lets an import stream tensor bytes straight from disk, in any
dtype (bfloat16 included), without loading a framework.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """The tensors of a safetensors file (in file order) and its metadata."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path.name}: too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise SafetensorsFormatError(f"{path.name}: header length {length} runs past the end of the file")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise SafetensorsFormatError(f"{path.name}: header is not JSON: {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype, shape = info["dtype"], tuple(info["shape"])
        expected = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if dtype not in DTYPE_BYTES or end - begin != expected:
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} ({dtype} {list(shape)}) has {end - begin} bytes")
        if base + end > size:
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} runs past the end of the file (truncated?)")
        entries.append(TensorEntry(name, dtype, shape, base + begin, base + end))
    return sorted(entries, key=lambda e: e.start), metadata
