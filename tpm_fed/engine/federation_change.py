"""A change to the federation file: applied to the file as written, validated as a whole, then adopted.

An operator's change (a project, a member, a grant, a site, a model) is an
edit of the file's plain data: a function from the federation as a dict to
the changed dict. The result is validated as a whole again (the same
checks ``Federation.load`` makes, so a grant at an unknown site or a
duplicate name is refused with the field named) before anything is written;
the file keeps its relative paths. What changed for the running sites is
worked out here too, so the engine can stop only those (:meth:`tpm_fed.engine.engine.Engine.change_federation`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tpm_fed.federation import Federation
from tpm_fed.protocol.errors import FederationConfigError
from tpm_fed.protocol.requests import describe_validation_error

FederationEdit = Callable[[dict[str, Any]], dict[str, Any]]
"""Takes the federation as plain data (every field present) and returns it changed."""


@dataclass(frozen=True)
class FederationChange:
    """A validated change, not yet written.

    Attributes:
        written: The federation as the file will hold it (paths relative to the file).
        loaded: The same, as the runtime uses it (paths made absolute).
        stopped_sites: Sites that are gone, or whose configuration changed: their
            replicas and engine stop; every other site keeps running untouched.
    """

    written: Federation
    loaded: Federation
    stopped_sites: frozenset[str]

    def write(self, path: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        self.written.dump(path)


def plan_change(path: Path, current: Federation, edit: FederationEdit) -> FederationChange:
    """Apply ``edit`` to the file at ``path`` and validate the result (nothing is written).

    Args:
        path: The federation file (read again: the file is the record, not a cached copy).
        current: The federation the runtime runs now (to tell which sites changed).

    Raises:
        FederationConfigError: The file as it is, or as changed, is not a valid federation.
    """
    written = _validated(edit(copy.deepcopy(_as_written(path).model_dump(mode="json"))))
    loaded = written.with_paths_relative_to(path.parent)
    kept = {site.name: site for site in loaded.sites}
    stopped = frozenset(site.name for site in current.sites if kept.get(site.name) != site)
    return FederationChange(written, loaded, stopped)


def _as_written(path: Path) -> Federation:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise FederationConfigError(f"{path}: cannot read the federation file: {error}") from None
    return _validated(raw)


def _validated(raw: Any) -> Federation:
    if not isinstance(raw, dict):
        raise FederationConfigError("the federation must be a mapping at the top level")
    try:
        return Federation.model_validate(raw)
    except ValidationError as error:
        raise FederationConfigError(describe_validation_error(error)) from None
