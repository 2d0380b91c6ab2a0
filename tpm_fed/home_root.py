"""Where the tpm home is: ``$TPM_HOME``, else ``~/.tpm``.

Its own module, importing nothing of ours, so that a warm ``tpm submit``
finds its home's service without importing the federation's models (which
:mod:`tpm_fed.home` needs for the embedded default, and which cost a third
of a second to import).
"""

from __future__ import annotations

import os
from pathlib import Path


def home_root() -> Path:
    """The home folder this process uses (it may not exist yet)."""
    return Path(os.environ.get("TPM_HOME", "~/.tpm")).expanduser().resolve()
