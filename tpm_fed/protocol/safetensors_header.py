"""Where each tensor's bytes lie in a safetensors file or blob, read from its header.

The format is an 8-byte little-endian header length, a JSON header (tensor
name -> dtype, shape, data_offsets), then the data. Reading the header
ourselves lets an import stream tensor bytes straight from disk, in any
dtype (bfloat16 included), without loading a framework; the same parser
checks an adapter's weights and describes a result's tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpm_fed.protocol.dtypes import BY_CODE


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # the safetensors code: F32, BF16...
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


Header = tuple[list[TensorEntry], dict[str, str]]
"""The tensors (in file order) and the metadata."""


def read_header(path: Path) -> Header:
    """The tensors of a safetensors file (in file order) and its metadata, reading only the header."""
    with path.open("rb") as handle:
        def read(offset: int, length: int) -> bytes:
            handle.seek(offset)
            return handle.read(length)

        return _parse(read, path.stat().st_size, path.name)


def parse_header(blob: bytes | memoryview, source: str = "safetensors data") -> Header:
    """The same, for safetensors bytes in memory; ``source`` names them in errors."""
    return _parse(lambda offset, length: bytes(blob[offset : offset + length]), len(blob), source)


def _parse(read: Callable[[int, int], bytes], size: int, source: str) -> Header:
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise SafetensorsFormatError(f"{source}: too short to be safetensors")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8:
        raise SafetensorsFormatError(f"{source}: header length {length} runs past the end of the file")
    try:
        header = json.loads(read(8, length))
    except ValueError as error:
        raise SafetensorsFormatError(f"{source}: header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{source}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries = []
    for name, info in header.items():
        try:
            begin, end = (int(n) for n in info["data_offsets"])
            dtype, shape = info["dtype"], tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{source}: tensor {name!r} has no dtype, shape and data_offsets") from None
        expected = math.prod(shape) * BY_CODE[dtype].itemsize if dtype in BY_CODE else None
        if begin < 0 or end - begin != expected:
            raise SafetensorsFormatError(f"{source}: tensor {name!r} ({dtype} {list(shape)}) has {end - begin} bytes")
        if base + end > size:
            raise SafetensorsFormatError(f"{source}: tensor {name!r} runs past the end of the file (truncated?)")
        entries.append(TensorEntry(name, dtype, shape, base + begin, base + end))
    return sorted(entries, key=lambda e: e.start), metadata
