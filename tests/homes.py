"""Homes the tests build: the session's demo model copied in (no training), one site, one project."""

from __future__ import annotations

import shutil
from pathlib import Path

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser


def demo_home(root: Path, demo_model_dir: Path, *, site: SiteConfig | None = None, project: str = "local",
              grant_su: float = 100.0) -> TpmHome:
    """A home like the embedded default's: ``site`` (a plain ``local`` one by default) serves the demo
    model with torch, and the current user's ``project`` holds ``grant_su`` there."""
    site = site or SiteConfig(name="local")
    home = TpmHome(root)
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="embedded",
        sites=[site],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name=project, members=[LocalUser().current()], allocations={site.name: grant_su})],
    ).dump(home.federation_file)
    return home
