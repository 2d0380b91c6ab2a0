"""Messages between the ranks of one split replica: an op, JSON metadata and named tensors.

Nothing is pickled (``send_object_list`` would be): a message is a header of
int64 numbers (op, metadata length, each tensor's dtype code and shape), the
metadata as UTF-8 bytes, then each tensor raw. The receiver allocates from the
header, so a rank only ever builds tensors and JSON from what arrives.

Any failure of the transport (a peer process gone, its socket closed) becomes
:class:`~tpm_fed.protocol.errors.ReplicaLost`: the replica is broken as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tpm_fed.protocol.errors import ReplicaLost

FORWARD, TRACE_BEGIN, TRACE_END, STOP, FAILED = 1, 2, 3, 4, 5
"""Ops: run the stage's layers; bind a trace's steps; collect what they saved; exit; a rank raised."""

_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "bool", "uint8")


@dataclass
class Message:
    op: int
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)


def send(message: Message, to: int) -> None:
    """Send ``message`` to rank ``to`` (blocking).

    Raises:
        ReplicaLost: The peer is gone.
    """
    import torch
    import torch.distributed as dist

    names = list(message.tensors)
    meta = json.dumps({**message.meta, "_names": names}).encode()
    header = [message.op, len(meta), len(names)]
    tensors = []
    for name in names:
        tensor = message.tensors[name].contiguous()
        header += [_DTYPES.index(str(tensor.dtype).removeprefix("torch.")), tensor.dim(), *tensor.shape]
        tensors.append(tensor)
    try:
        dist.send(torch.tensor([len(header)], dtype=torch.int64), to)
        dist.send(torch.tensor(header, dtype=torch.int64), to)
        dist.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8), to)
        for tensor in tensors:
            dist.send(tensor, to)
    except RuntimeError as error:  # gloo: "Connection closed by peer", "Socket closed", timeouts
        raise ReplicaLost(f"rank {to} of this replica is gone ({_first_line(error)})") from None


def receive(source: int) -> Message:
    """The next message from rank ``source`` (blocking).

    Raises:
        ReplicaLost: The peer is gone.
    """
    import torch
    import torch.distributed as dist

    try:
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, source)
        header = torch.empty(int(length), dtype=torch.int64)
        dist.recv(header, source)
        op, meta_length, count, *shapes = header.tolist()
        raw = torch.empty(meta_length, dtype=torch.uint8)
        dist.recv(raw, source)
        meta = json.loads(bytes(raw.numpy()))
        tensors = {}
        for name in meta.pop("_names"):
            code, ndim, *shapes = shapes
            shape, shapes = shapes[:ndim], shapes[ndim:]
            tensor = torch.empty(shape, dtype=getattr(torch, _DTYPES[code]))
            dist.recv(tensor, source)
            tensors[name] = tensor
    except RuntimeError as error:
        raise ReplicaLost(f"rank {source} of this replica is gone ({_first_line(error)})") from None
    if count != len(tensors):
        raise ReplicaLost(f"rank {source} sent a malformed message")
    return Message(op, meta, tensors)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
