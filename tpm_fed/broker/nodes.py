"""How many nodes a replica needs at a site, or why the site cannot give them.

A model is split ``tensor_parallel_size`` (TP) ways within each layer and
``pipeline_parallel_size`` (PP) ways across its layers: ``TP x PP`` ranks. A
rank holds one accelerator (GPU sites) or is one process (models without
accelerators, whose "accelerators per node" are the site's processes per
node). A tensor-parallel group talks at every layer, so it stays on one node
when it fits (vLLM's advice: TP = accelerators per node, PP = nodes); whole
stages are packed onto nodes. A replica runs as one task, and a task cannot
span blocks: the site must give a block of that many nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from tpm_fed.federation import SiteConfig


class Split(Protocol):
    """How a model is split: the federation's :class:`~tpm_fed.federation.ModelConfig`, or the
    :class:`~tpm_fed.protocol.model.ModelSpec` a task carries."""

    name: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    accelerators: int

    @property
    def world_size(self) -> int: ...


def nodes_needed(tensor_parallel: int, pipeline_parallel: int, ranks_per_node: int) -> int:
    """Nodes for ``tensor_parallel x pipeline_parallel`` ranks, ``ranks_per_node`` to a node.

    Each tensor-parallel group stays on one node when it fits there, so a
    node holds ``ranks_per_node // tensor_parallel`` whole stages; a group
    larger than a node takes ``ceil(TP / ranks_per_node)`` nodes of its own.
    Where TP divides ``ranks_per_node`` this is ``ceil(TP x PP / ranks_per_node)``.
    """
    if min(tensor_parallel, pipeline_parallel, ranks_per_node) < 1:
        raise ValueError("tensor_parallel, pipeline_parallel and ranks_per_node are at least 1")
    if tensor_parallel <= ranks_per_node:
        return math.ceil(pipeline_parallel / (ranks_per_node // tensor_parallel))
    return pipeline_parallel * math.ceil(tensor_parallel / ranks_per_node)


@dataclass(frozen=True)
class NodeFit:
    """A model's replica at a site: its nodes, and why the site cannot host it (``None``: it can).

    Attributes:
        nodes: Nodes one replica holds there (all charged).
        ranks_per_node: Ranks each node runs (its accelerators, or its processes on CPU).
        unit: What a rank holds: ``GPUs`` or ``processes``.
        refusal: Why the site cannot host it, in the operator's terms.
    """

    nodes: int
    ranks_per_node: int
    unit: str
    refusal: str | None = None

    def describe(self, model: Split) -> str:
        """"2 nodes of 4 GPUs (TP 4 x PP 2)"."""
        plural = "s" if self.nodes != 1 else ""
        return (f"{self.nodes} node{plural} of {self.ranks_per_node} {self.unit} "
                f"(TP {model.tensor_parallel_size} x PP {model.pipeline_parallel_size})")


def node_fit(model: Split, site: SiteConfig) -> NodeFit:
    """Whether ``site`` can give one replica of ``model`` the nodes it needs, and how many."""
    uses_accelerators = model.accelerators > 0
    per_node = site.accelerators_per_node if uses_accelerators else site.nodes.processes_per_node
    unit = "GPUs" if uses_accelerators else "processes"
    if per_node == 0:
        return NodeFit(0, 0, unit, refusal=f"needs {model.accelerators} accelerators "
                                           f"(TP {model.tensor_parallel_size} x PP {model.pipeline_parallel_size}); "
                                           f"site {site.name} has no accelerators")
    fit = NodeFit(nodes_needed(model.tensor_parallel_size, model.pipeline_parallel_size, per_node), per_node, unit)
    block = site.nodes.max_nodes_per_block
    if fit.nodes > block:
        plural = "s" if block != 1 else ""
        return NodeFit(fit.nodes, per_node, unit,
                       refusal=f"needs {fit.describe(model)}; site {site.name} gives blocks of {block} node{plural}")
    return fit


def mpi_resource_specification(model: Split, fit: NodeFit) -> dict[str, int]:
    """What a task asks an MPI engine (Globus Compute's ``GlobusMPIEngine``, Parsl's ``MPIExecutor``)
    for one replica: its nodes and its ranks, so the task's ``$PARSL_MPI_PREFIX`` starts every rank."""
    ranks = model.world_size
    return {"num_nodes": fit.nodes, "num_ranks": ranks, "ranks_per_node": math.ceil(ranks / fit.nodes)}
