"""How many torch threads a vLLM engine in this process uses on a CPU: vLLM's own server's rule.

vLLM's own server on a CPU runs its model in a worker process whose OpenMP
threads it binds to every physical core this process may use *but* those it
reserves (``VLLM_CPU_NUM_OF_RESERVED_CPU``, one per rank by default) for its
scheduler and HTTP front end (``vllm/utils/ompmultiprocessing.py``: on this
2-core machine it logs ``core ids=[0], reserved_cpus=[1]``). In-process, as our
worker runs it (the ``uni`` executor), vLLM sets nothing, and torch takes
every core. The worker's own threads (the back channel, Parsl's) and, on a
local site, the service then preempt one of the engine's threads in the middle
of each parallel region and the whole step waits for it: measured beside other
work, a 16-row decode step of the demo model took 14.5 ms on two threads and
2.8 ms on one (2.8 ms on either on an idle machine; docs/performance.md).
"""

from __future__ import annotations

import os
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")

DEFAULT_RESERVED = 1
"""Cores left to the serving around the engine, as vLLM's server leaves one per rank."""


def engine_threads() -> int | None:
    """The torch threads for an in-process engine on a CPU, or ``None`` where the operator chose
    (``OMP_NUM_THREADS`` set: vLLM itself leaves it alone then)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", DEFAULT_RESERVED))
    return max(1, physical_cores(os.sched_getaffinity(0)) - reserved)


def physical_cores(cpus: set[int]) -> int:
    """Physical cores among these logical CPUs (vLLM binds one thread per physical core, not per SMT sibling)."""
    cores = set()
    for cpu in cpus:
        topology = SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no topology to read (a container may hide it): count it as its own core
            cores.add(("cpu", str(cpu)))
    return len(cores)
