"""How large a replica a model needs: its weights, the GPUs they fill, and the nodes those span.

An operator's first question for a large model: how many nodes of which GPUs?
The weights take ``parameters x bytes per parameter``; each GPU may give them
at most ``1 - HEADROOM`` of its memory, the rest being left for the KV cache,
activations and the runtime. The split follows vLLM's advice (and
:func:`tpm_fed.broker.nodes.nodes_needed`): on one node, tensor parallel over
the fewest GPUs that hold the weights (a power of two, which divides these
models' attention heads); across nodes, tensor parallel = GPUs per node and one
pipeline stage per node. docs/multinode.md prints :func:`sizing_table`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpm_fed.broker.nodes import nodes_needed

HEADROOM = 0.30
"""Share of each GPU's memory kept from the weights: KV cache, activations, CUDA context and graphs.
(vLLM's default ``gpu_memory_utilization`` 0.9 keeps 10% out of its reach; this leaves the KV cache at
least 20% more, room for a few dozen 8k-token sequences on these models.)"""

BYTES_PER_PARAMETER = {"bf16": 2.0, "fp8": 1.0}

MODELS = {"70B": 70e9, "405B": 405e9, "1T": 1e12}
"""Nominal parameter counts (Llama 3.1 70B and 405B, a trillion-parameter model)."""

GPUS = {"80 GB": 80.0, "141 GB": 141.0}
"""A100/H100 80 GB, H200 141 GB."""

GPUS_PER_NODE = (8, 4)


@dataclass(frozen=True)
class Sizing:
    """One model at one precision on one kind of node.

    Attributes:
        weights_gb: The weights, in GB (1e9 bytes).
        gpus: Accelerators the replica uses (``tensor_parallel x pipeline_parallel``).
        weights_per_node_gb: The share of the weights each node holds.
        weights_per_gpu_gb: The share each GPU holds (at most ``(1 - HEADROOM) x`` its memory).
    """

    model: str
    parameters: float
    precision: str
    gpu_gb: float
    gpus_per_node: int
    weights_gb: float
    tensor_parallel: int
    pipeline_parallel: int
    nodes: int

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def weights_per_node_gb(self) -> float:
        return self.weights_gb / self.nodes

    @property
    def weights_per_gpu_gb(self) -> float:
        return self.weights_gb / self.gpus


def size(model: str, parameters: float, precision: str, gpu_gb: float, gpus_per_node: int) -> Sizing:
    """The smallest split of ``parameters`` weights at ``precision`` onto GPUs of ``gpu_gb``."""
    weights_gb = parameters * BYTES_PER_PARAMETER[precision] / 1e9
    gpus = math.ceil(weights_gb / (gpu_gb * (1 - HEADROOM)))
    if gpus <= gpus_per_node:
        tensor_parallel, pipeline_parallel = 1 << (gpus - 1).bit_length(), 1
        tensor_parallel = min(tensor_parallel, gpus_per_node)
    else:
        tensor_parallel, pipeline_parallel = gpus_per_node, math.ceil(gpus / gpus_per_node)
    nodes = nodes_needed(tensor_parallel, pipeline_parallel, gpus_per_node)
    return Sizing(model, parameters, precision, gpu_gb, gpus_per_node, weights_gb, tensor_parallel,
                  pipeline_parallel, nodes)


def sizings() -> list[Sizing]:
    """Every model x precision x GPU x GPUs per node of the docs' table."""
    return [size(model, parameters, precision, gpu_gb, per_node)
            for model, parameters in MODELS.items() for precision in BYTES_PER_PARAMETER
            for gpu_gb in GPUS.values() for per_node in GPUS_PER_NODE]


def sizing_table() -> str:
    """The sizing table as Markdown (docs/multinode.md holds exactly this)."""
    gpu_names = {gb: name for name, gb in GPUS.items()}
    rows = ["| model | parameters | precision | weights | GPU | GPUs/node | TP x PP | GPUs | weights/GPU "
            "| weights/node | nodes |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizings():
        rows.append(f"| {s.model} | {s.parameters / 1e9:,.0f} B | {s.precision} | {s.weights_gb:,.0f} GB "
                    f"| {gpu_names[s.gpu_gb]} | {s.gpus_per_node} | {s.tensor_parallel} x {s.pipeline_parallel} "
                    f"| {s.gpus} | {s.weights_per_gpu_gb:,.1f} GB | {s.weights_per_node_gb:,.0f} GB | {s.nodes} |")
    return "\n".join(rows)
