"""A site inside the RCC: an endpoint config's engine, run by this process.

A broker that runs on an RCC's login or service node needs no cloud hop to
reach the cluster: the same endpoint config an operator would give
``globus-compute-endpoint`` (engine, Parsl provider such as ``SlurmProvider``
or ``PBSProProvider``, launcher, ``worker_init``) is loaded by the endpoint
package's own loader, and its engine is started here. Blocks are then
submitted to the batch scheduler by Parsl, exactly as the endpoint would.
The workers' policy (may callers' code run, where the adapter registry is)
is the config's own: its ``worker_init`` sets ``TPM_ALLOW_CALLER_CODE``,
``TPM_ADAPTER_REGISTRY``... (see ``endpoint_configs/`` and
``functions/policy.py``); the federation file has no say, and tasks none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from tpm_fed.protocol.errors import FederationConfigError
from tpm_fed.federation import SiteConfig
from tpm_fed.sites.engine import EngineSite
from tpm_fed.sites.task_resources import CLUSTER_LAUNCHERS


def load_engine_config(path: Path) -> Any:
    """The endpoint config at ``path``, loaded and validated by the endpoint package.

    Raises:
        FederationConfigError: The file is missing or the loader rejects it (its message).
    """
    import click
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise FederationConfigError(f"engine_config {path}: {error.strerror}") from None
    try:
        return load_config_yaml(text)
    except click.ClickException as error:
        raise FederationConfigError(f"engine_config {path}: {error.format_message()}") from None


class ParslEngineSite(EngineSite):
    """The engine of an endpoint config, started by this process (no cloud hop).

    Args:
        name: Site name.
        engine_config: The endpoint config YAML.
        run_dir: Where the engine keeps logs and task folders.
    """

    access = "parsl"

    def __init__(self, name: str, engine_config: Path, run_dir: Path) -> None:
        super().__init__(name, run_dir)
        self.engine_config = Path(engine_config)
        self._config = load_engine_config(self.engine_config)
        self._config_used = False

    @classmethod
    def from_config(cls, config: SiteConfig, run_dir: Path) -> Self:
        assert config.engine_config is not None  # the federation checked it
        site = cls(name=config.name, engine_config=config.engine_config, run_dir=run_dir)
        site.site_config = config
        engine = type(site.engine).__name__
        if config.nodes.launcher in CLUSTER_LAUNCHERS and engine != "GlobusMPIEngine":
            site.shutdown()
            raise FederationConfigError(
                f"site {config.name!r}: nodes.launcher {config.nodes.launcher} starts a replica's ranks on a "
                f"block's nodes through an MPI engine, but engine_config {config.engine_config} runs {engine}; "
                "use type: GlobusMPIEngine there (endpoint_configs/multi-node/)")
        if engine == "GlobusMPIEngine" and site.engine.executor.mpi_launcher != config.nodes.launcher:
            site.shutdown()
            raise FederationConfigError(
                f"site {config.name!r}: engine_config {config.engine_config} launches ranks with "
                f"{site.engine.executor.mpi_launcher}; write nodes.launcher: {site.engine.executor.mpi_launcher}")
        return site

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "engine_config": str(self.engine_config), "run_dir": str(self.run_dir)}

    @property
    def engine(self) -> Any:
        """The configured engine (its ``executor.provider`` is the Parsl provider)."""
        return self._config.engine

    @property
    def workers(self) -> int:
        return int(self._config.engine.executor.max_workers_per_node)

    def _make_engine(self) -> Any:
        if self._config_used:  # an engine runs once: a restart after shutdown needs a new one
            self._config = load_engine_config(self.engine_config)
        self._config_used = True
        return self._config.engine

    def shutdown(self) -> None:
        super().shutdown()
        if not self._config_used:
            # Loading the config built an engine object; release what it holds.
            self._config.engine.shutdown()
            self._config_used = True
