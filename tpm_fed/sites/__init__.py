"""Sites: where registered functions run. One kind per file, behind :class:`Site`.

- ``local``: :class:`~tpm_fed.sites.local.LocalSite`, the endpoint engine on this machine.
- ``parsl``: :class:`~tpm_fed.sites.parsl_engine.ParslEngineSite`, an endpoint
  config's engine (Slurm, PBS...) run by this process.
- ``globus-compute``: :class:`~tpm_fed.sites.globus_compute.GlobusComputeSite`,
  an endpoint reached through the Globus Compute service.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tpm_fed.federation import SiteConfig
from tpm_fed.sites.base import Site, SiteStatus


def build_site(config: SiteConfig, run_root: Path, model_roots: Iterable[Path] | None = None) -> Site:
    """Make the site a federation entry describes (nothing starts yet).

    ``model_roots``: the folders a local site's workers may load models from
    (:func:`~tpm_fed.sites.local.model_roots_of`); other sites' endpoints set their own.
    """
    if config.access == "local":
        from tpm_fed.sites.local import LocalSite

        return LocalSite.from_config(config, run_dir=run_root / config.name, model_roots=model_roots)
    if config.access == "parsl":
        from tpm_fed.sites.parsl_engine import ParslEngineSite

        return ParslEngineSite.from_config(config, run_dir=run_root / config.name)
    if config.access == "globus-compute":
        from tpm_fed.sites.globus_compute import GlobusComputeSite

        return GlobusComputeSite.from_config(config)
    raise ValueError(f"unknown site access {config.access!r}")


__all__ = ["Site", "SiteStatus", "build_site"]
