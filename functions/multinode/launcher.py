"""Starting the other ranks of a split replica, and making sure none outlives it.

Every launcher gives each rank the same environment contract torch.distributed
uses on a cluster: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
plus the model spec (``TPM_STAGE_SPEC``, JSON data). The endpoint worker that
loads the replica is rank 0 and serves; it starts ranks 1..N-1:

- :class:`LocalLauncher`: N-1 processes on this host ("nodes" are processes;
  what the tests and the CPU benchmarks use). Each dies with the worker
  (``PR_SET_PDEATHSIG``), and is killed by :meth:`stop`.
- :class:`MpiLauncher`: inside a multi-node task (Globus Compute's
  ``GlobusMPIEngine`` or Parsl's ``MPIExecutor`` with ``num_nodes``), through
  the task's ``$PARSL_MPI_PREFIX`` (``mpiexec``/``srun`` with the block's
  node list); each rank reads its number from the MPI launcher's environment.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpm_fed.protocol.model import ModelSpec

RANK_MODULE = "functions.multinode.rank"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills the rank if the worker dies


class LocalLauncher:
    """Ranks 1..N-1 as processes of this host."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.port = free_port(self.host)
        self._logs = Path(tempfile.mkdtemp(prefix="tpm-ranks-"))  # 0700: the ranks' stderr, for errors

    def environment(self, spec: ModelSpec, rank: int, world_size: int) -> dict[str, str]:
        return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": self.host,
                "MASTER_PORT": str(self.port), "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                "TPM_STAGE_SPEC": spec.model_dump_json()}

    def start(self, spec: ModelSpec, world_size: int) -> None:
        for rank in range(1, world_size):
            log = os.open(self._logs / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", RANK_MODULE], env=self.environment(spec, rank, world_size),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent))
            finally:
                os.close(log)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def exited(self) -> list[tuple[int, int]]:
        """(rank, exit code) of each rank that has ended."""
        return [(rank, process.returncode) for rank, process in enumerate(self.processes, start=1)
                if process.poll() is not None]

    def log_tail(self, rank: int, lines: int = 3) -> str:
        try:
            text = (self._logs / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """End every rank: those still running after ``grace_s`` are killed; waits for all."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        for process in self.processes:
            process.wait()

    def kill(self) -> None:
        """End every rank now (the replica is lost)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()


class MpiLauncher(LocalLauncher):
    """Ranks 1..N-1 on the task's other nodes through ``$PARSL_MPI_PREFIX``.

    The prefix is set by the MPI engine for this task's ``num_nodes`` x
    ``ranks_per_node``; rank 0 is this process, so the ranks it starts count from 1
    (``TPM_RANK_OFFSET``) and meet at this node's address.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.host = socket.gethostbyname(socket.gethostname())
        super().__init__()

    def command(self) -> list[str]:
        return [*shlex.split(self.prefix), sys.executable, "-m", RANK_MODULE]

    def start(self, spec: ModelSpec, world_size: int) -> None:
        env = {**self.environment(spec, -1, world_size), "TPM_RANK_OFFSET": "1"}
        env.pop("GLOO_SOCKET_IFNAME")  # across nodes: the interface that reaches MASTER_ADDR
        log = os.open(self._logs / "rank1.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.processes.append(subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                                   stdout=log, stderr=log, preexec_fn=_die_with_parent))
        finally:
            os.close(log)


def launcher_here() -> LocalLauncher:
    """The MPI launcher inside a multi-node task, else local processes."""
    prefix = os.environ.get("PARSL_MPI_PREFIX")
    return MpiLauncher(prefix) if prefix else LocalLauncher()


MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "PALS_RANKID")


def rank_from_environment(environ: dict[str, str]) -> int:
    """This rank's number: ``RANK``, or the MPI launcher's own plus ``TPM_RANK_OFFSET``."""
    if int(environ.get("RANK", "-1")) >= 0:
        return int(environ["RANK"])
    for name in MPI_RANK_VARIABLES:
        if name in environ:
            return int(environ[name]) + int(environ.get("TPM_RANK_OFFSET", "0"))
    raise RuntimeError("no RANK and no MPI rank in the environment")
