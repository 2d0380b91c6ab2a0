"""A site on this machine: the endpoint engine with Parsl's ``LocalProvider``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from tpm_fed.federation import SiteConfig
from tpm_fed.sites.engine import EngineSite

STRATEGY_PERIOD_S = 0.5
"""How often Parsl's scaling loop runs; its first pass starts the worker block."""


class LocalSite(EngineSite):
    """One machine's worker pool behind the Globus Compute endpoint engine.

    The engine starts on the first submit (about a second, plus the worker
    block), as :class:`~tpm_fed.sites.engine.EngineSite` describes.

    Args:
        name: Site name.
        run_dir: Where the engine keeps logs and task folders.
        workers: Worker processes; each is one replica slot.
    """

    access = "local"

    def __init__(self, name: str, run_dir: Path, workers: int = 1) -> None:
        super().__init__(name, run_dir)
        self._workers = workers

    @classmethod
    def from_config(cls, config: SiteConfig, run_dir: Path) -> Self:
        return cls(name=config.name, run_dir=run_dir, workers=config.capacity.max_replicas)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": str(self.run_dir), "workers": self.workers}

    @property
    def workers(self) -> int:
        return self._workers

    def _make_engine(self) -> Any:
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        return GlobusComputeEngine(
            label=f"tpm-{self.name}",
            address="127.0.0.1",
            max_workers_per_node=self.workers,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            job_status_kwargs={"strategy_period": STRATEGY_PERIOD_S},
            encrypted=False,  # loopback only; CurveZMQ buys nothing here
        )
