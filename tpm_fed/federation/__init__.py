"""The federation file: sites, models, projects, prices and the network between them.

It is operator-owned YAML, validated as a whole when loaded; every mistake is
reported with the field it concerns (unknown keys, negative prices, capacity
0, missing distances, duplicate names, a bring-your-own site without an
owner...). Relative model paths are resolved against the folder holding the
file, so a federation folder can be moved.

One module per entry: :mod:`.sites`, :mod:`.models`, :mod:`.projects`, :mod:`.prices`, :mod:`.slos`
(on :mod:`.base`'s strict model); :mod:`.file`, the file as a whole (:class:`Federation`: loaded,
checked across entries, dumped); :mod:`.renamed_keys`, keys renamed since older files were written.
"""

from tpm_fed.federation.base import Name
from tpm_fed.federation.file import Federation
from tpm_fed.federation.models import ModelConfig
from tpm_fed.federation.prices import Price, Prices
from tpm_fed.federation.projects import ProjectConfig
from tpm_fed.federation.sites import (
    Capacity,
    Launcher,
    Nodes,
    RegisteredFunction,
    SiteConfig,
    WorkerSettings,
)
from tpm_fed.federation.slos import Slos, SloTarget

__all__ = [
    "Capacity", "Federation", "Launcher", "ModelConfig", "Name", "Nodes", "Price", "Prices", "ProjectConfig",
    "RegisteredFunction", "SiteConfig", "SloTarget", "Slos", "WorkerSettings",
]
