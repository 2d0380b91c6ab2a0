"""The tpm home folder (``$TPM_HOME``, default ``~/.tpm``) and the embedded default.

Layout::

    federation.yaml      sites and models (operator-owned)
    tpm.db               SQLite: request log, replicas seen
    models/demo-llama/   the demo model, made on this machine
    sites/<name>/        engine run folders and logs
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.identity import LocalUser

DEMO_MODEL_NAME = "demo-llama"
DEFAULT_GRANT_SU = 1000.0
"""Service units the local user's project gets at the local site in the embedded default."""


@dataclass(frozen=True)
class TpmHome:
    """Paths inside one tpm home folder."""

    root: Path

    @classmethod
    def default(cls) -> TpmHome:
        return cls(Path(os.environ.get("TPM_HOME", "~/.tpm")).expanduser().resolve())

    @property
    def federation_file(self) -> Path:
        return self.root / "federation.yaml"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'tpm.db'}"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def ensure_embedded_default(self, *, progress: bool = True) -> None:
        """Create the embedded federation here if there is none yet.

        One local site, the demo model (trained now, ~15 s, with a progress
        bar), one project holding the local user with an allocation at the
        site and, beside them, the database, created on first use.
        """
        demo_dir = self.models_dir / DEMO_MODEL_NAME
        if not self.federation_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            federation = Federation(
                name="embedded",
                sites=[SiteConfig(name="local")],
                models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME,
                                    kinds=["generate", "embed", "trace"])],
                projects=[ProjectConfig(name="local", members=[LocalUser().current()],
                                        allocations={"local": DEFAULT_GRANT_SU})],
            )
            federation.dump(self.federation_file)
            if progress:
                print(f"tpm: created federation {self.federation_file}", file=sys.stderr)
        if not demo_dir.exists() and self._federation_uses(demo_dir):
            from tpm_fed.models.demo import make_demo_model

            if progress:
                print(f"tpm: making the demo model in {demo_dir} (once, ~15 s)", file=sys.stderr)
            make_demo_model(demo_dir, progress=progress)

    def _federation_uses(self, model_dir: Path) -> bool:
        federation = Federation.load(self.federation_file)
        return any(model.path == model_dir.resolve() for model in federation.models)
