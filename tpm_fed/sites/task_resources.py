"""What a task asks its site's engine for: the site's own resource specification, and for a replica over
several nodes, those nodes.

A replica larger than one node runs as one task holding all its nodes; on a
cluster, that task goes to an MPI engine (Globus Compute's ``GlobusMPIEngine``,
Parsl's ``MPIExecutor``), which gives it ``num_nodes`` nodes of one block and
``$PARSL_MPI_PREFIX`` to start its ranks there. The site reads the split from
the model spec the serving task carries (its first argument), so the broker's
decision and the task's request are computed by one function
(:func:`tpm_fed.broker.nodes.node_fit`). On ``local-processes`` sites the
ranks are processes the worker starts itself: nothing to ask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpm_fed.federation import SiteConfig
from tpm_fed.protocol.errors import PlacementRefused
from tpm_fed.protocol.model import ModelSpec

CLUSTER_LAUNCHERS = ("mpiexec", "srun", "aprun")


def task_resources(site: SiteConfig, args: Sequence[Any]) -> dict[str, Any]:
    """The ``resource_specification`` of a task of ``args`` at ``site``.

    Raises:
        PlacementRefused: The task's model needs a larger block than the site gives (the broker
            does not place it there; a task sent anyway is refused before it reaches the site).
    """
    base = dict(site.resource_specification or {})
    spec = _spec_in(args)
    if spec is None or spec.world_size == 1 or site.nodes.launcher not in CLUSTER_LAUNCHERS:
        return base
    from tpm_fed.broker.nodes import mpi_resource_specification, node_fit

    fit = node_fit(spec, site)
    if fit.refusal is not None:
        raise PlacementRefused(f"model {spec.name!r} at site {site.name!r}: {fit.refusal}")
    return {**base, **mpi_resource_specification(spec, fit)}


def _spec_in(args: Sequence[Any]) -> ModelSpec | None:
    """The model spec a serving task carries first, if it is one."""
    first = args[0] if args else None
    if not isinstance(first, dict) or "pipeline_parallel_size" not in first:
        return None
    return ModelSpec.from_wire(first)
