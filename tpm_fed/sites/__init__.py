"""Sites: where registered functions run. One kind per file, behind :class:`Site`."""

from __future__ import annotations

from pathlib import Path

from tpm_fed.federation import SiteConfig
from tpm_fed.sites.base import Site, SiteStatus


def build_site(config: SiteConfig, run_root: Path) -> Site:
    """Make the site a federation entry describes (nothing starts yet)."""
    if config.access == "local":
        from tpm_fed.sites.local import LocalSite

        return LocalSite.from_config(config, run_dir=run_root / config.name)
    raise ValueError(f"unknown site access {config.access!r}")


__all__ = ["Site", "SiteStatus", "build_site"]
