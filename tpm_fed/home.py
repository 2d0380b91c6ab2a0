"""The tpm home folder (``$TPM_HOME``, default ``~/.tpm``) and the embedded default.

Layout::

    federation.yaml      sites and models (operator-owned)
    tpm.db               SQLite: request log, replicas seen
    models/demo-llama/   the demo model, made on this machine
                         (the default encoder is read where pip installed it)
    sites/<name>/        engine run folders and logs
    service.json         the running service's URL and local token
    service.log          what the background-started service prints (never the token)

The home and everything in it are its owner's alone (0700 folders, files
without group or other bits): it holds the token, the database (callers'
prompts and batch files) and the log. The service works under umask 077,
and :meth:`TpmHome.make_private` fixes a home made before, at each start.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home_root import home_root
from tpm_fed.identity import LocalUser
from tpm_fed.models.demo import make_demo_model
from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir

logger = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
"""The service's umask: what it creates (files 0600, folders 0700) is its owner's alone."""

DEMO_MODEL_NAME = "demo-llama"
DEFAULT_GRANT_SU = 1000.0
"""Service units the local user's project gets at the local site in the embedded default."""


@dataclass(frozen=True)
class TpmHome:
    """Paths inside one tpm home folder."""

    root: Path

    @classmethod
    def default(cls) -> TpmHome:
        return cls(home_root())

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

    def create(self) -> None:
        """Make the home folder, its owner's alone (0700, whatever the caller's umask)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)

    def make_private(self) -> list[Path]:
        """Take group and other permissions off the home and everything in it; return what had them.

        A home made before this rule (0755, files 0644) is fixed at the service's start, with a
        warning naming how many paths were opened to other users. Links are not followed (a
        model folder the federation names elsewhere is the operator's to set).
        """
        was_open = self.root.exists() and bool(self.root.stat().st_mode & 0o077)
        self.create()
        opened: list[Path] = [self.root] if was_open else []
        for folder, subfolders, files in os.walk(self.root):
            for name in [*subfolders, *files]:
                path = Path(folder) / name
                try:
                    mode = path.lstat().st_mode
                    if stat.S_ISLNK(mode) or not mode & 0o077:
                        continue
                    path.chmod(stat.S_IMODE(mode) & ~0o077)
                except FileNotFoundError:  # a file the running service removed meanwhile
                    continue
                opened.append(path)
        if opened:
            logger.warning("tpm: %d paths in %s were readable by other users (the database, the log, the token "
                           "file among them?); they are now the owner's alone, e.g. %s",
                           len(opened), self.root, ", ".join(str(p) for p in opened[:5]))
        return opened

    def ensure_embedded_default(self, *, progress: bool = True) -> None:
        """Create the embedded federation here if there is none yet.

        One local site, the demo model (trained now, ~15 s, with a progress
        bar), the default encoder (installed with tpm-fed: nothing to make),
        one project holding the local user with an allocation at the site
        and, beside them, the database, created on first use.
        """
        demo_dir = self.models_dir / DEMO_MODEL_NAME
        if not self.federation_file.exists():
            self.create()
            models = [ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME,
                                  kinds=["generate", "embed", "trace"])]
            encoder_dir = default_encoder_dir()
            if encoder_dir is not None:  # a dependency of tpm-fed: missing only from a broken install
                models.append(ModelConfig(name=DEFAULT_ENCODER_NAME, path=encoder_dir, kinds=["encode"]))
            federation = Federation(
                name="embedded",
                sites=[SiteConfig(name="local")],
                models=models,
                projects=[ProjectConfig(name="local", members=[LocalUser().current()],
                                        allocations={"local": DEFAULT_GRANT_SU})],
            )
            federation.dump(self.federation_file)
            if progress:
                print(f"tpm: created federation {self.federation_file}", file=sys.stderr)
        if not demo_dir.exists() and self._federation_uses(demo_dir):
            if progress:
                print(f"tpm: making the demo model in {demo_dir} (once, ~15 s)", file=sys.stderr)
            make_demo_model(demo_dir, progress=progress)

    def _federation_uses(self, model_dir: Path) -> bool:
        federation = Federation.load(self.federation_file)
        return any(model.path == model_dir.resolve() for model in federation.models)
