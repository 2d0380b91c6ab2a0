"""The federation file as a whole: read, validated across its entries (names, owners, sites, distances),
paths made relative to its folder, written back; entries looked up by name.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import product
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from pydantic import Field, ValidationError, model_validator

from tpm_fed.federation.base import _Strict
from tpm_fed.federation.models import ModelConfig
from tpm_fed.federation.prices import Prices
from tpm_fed.federation.projects import ProjectConfig
from tpm_fed.federation.sites import SiteConfig
from tpm_fed.federation.slos import Slos
from tpm_fed.protocol.errors import FederationConfigError, TpmError, UnknownModel
from tpm_fed.protocol.requests import describe_validation_error
from tpm_fed.storage.atomic import write_atomically


def _join_surrogates(value: Any) -> Any:
    """Strings as Python means them: PyYAML reads a JSON escape pair (``\\ud83d\\ude00``) as two
    lone surrogates, which no UTF-8 writer can dump again; join each pair into its character.

    Raises:
        UnicodeError: A surrogate with no partner (not text).
    """
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16") if any(
            "\ud800" <= ch <= "\udfff" for ch in value) else value
    if isinstance(value, dict):
        return {_join_surrogates(k): _join_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_surrogates(item) for item in value]
    return value


class Federation(_Strict):
    """Sites, models, projects, prices and network latencies, as the operator wrote them.

    Attributes:
        latency_ms: Network latency between locations (site locations and named
            caller locations), in either direction; a location is 0 from itself.
        default_location: Where callers are when they do not say.
        store: The model store's folder (relative to the federation file).
    """

    name: str = "embedded"
    sites: list[SiteConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)
    projects: list[ProjectConfig] = Field(default_factory=list)
    prices: Prices = Prices()
    latency_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    default_location: str = "local"
    store: Path = Path("store")
    slos: Slos = Slos()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for kind, items in (("sites", self.sites), ("models", self.models), ("projects", self.projects)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names: {', '.join(duplicates)}")
        site_names = {s.name for s in self.sites}
        project_names = {p.name for p in self.projects}
        for site in self.sites:
            if site.owner and site.owner not in project_names:
                raise ValueError(f"site {site.name!r}: owner {site.owner!r} is not a project")
        for model in self.models:
            for site in model.sites:
                if site not in site_names:
                    raise ValueError(f"model {model.name!r}: unknown site {site!r}")
        for project in self.projects:
            for site in project.allocations:
                if site not in site_names:
                    raise ValueError(f"project {project.name!r}: allocation at unknown site {site!r}")
        for source, row in self.latency_ms.items():
            for target, value in row.items():
                if value < 0:
                    raise ValueError(f"latency_ms.{source}.{target}: negative latency")
        caller_locations = set(self.latency_ms) | {self.default_location}
        for caller, site in product(sorted(caller_locations), self.sites):
            if self.latency(caller, site.location) is None:
                raise ValueError(
                    f"latency_ms: no distance between {caller!r} and site {site.name!r} "
                    f"(location {site.location!r})"
                )
        return self

    def latency(self, a: str, b: str) -> float | None:
        """Milliseconds between two locations, or ``None`` if the table has no entry."""
        if a == b:
            return 0.0
        forward = self.latency_ms.get(a, {}).get(b)
        return forward if forward is not None else self.latency_ms.get(b, {}).get(a)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read and validate a federation file; model paths become absolute."""
        try:
            raw = _join_surrogates(yaml.safe_load(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FederationConfigError(f"federation file not found: {path}") from None
        except UnicodeError as error:
            raise FederationConfigError(f"{path}: not UTF-8 text: {error}") from None
        except yaml.YAMLError as error:
            raise FederationConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise FederationConfigError(f"{path}: expected a mapping at the top level")
        try:
            federation = cls.model_validate(raw)
        except ValidationError as error:
            raise FederationConfigError(f"{path}: {describe_validation_error(error)}") from None
        return federation.with_paths_relative_to(path.parent)

    def with_paths_relative_to(self, folder: Path) -> Self:
        models = [
            m.model_copy(update={"path": (folder / m.path).resolve()}) if m.path is not None else m
            for m in self.models
        ]
        sites = [
            s.model_copy(update={"engine_config": (folder / s.engine_config).resolve()})
            if s.engine_config is not None else s
            for s in self.sites
        ]
        sites = [s.with_adapter_registry_in(folder, default=self.store / "adapters")
                 .with_results_in(folder, default=self.store / "results") for s in sites]
        return self.model_copy(update={"models": models, "sites": sites, "store": (folder / self.store).resolve()})

    def dump(self, path: Path) -> None:
        """Write atomically: a crash never leaves half a federation file."""
        write_atomically(path, yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False))

    def model(self, name: str) -> ModelConfig:
        """The model ``name``; :class:`UnknownModel`, listing the known ones, if there is none."""
        return _named(self.models, name, "model", UnknownModel, verb="serves")

    def site(self, name: str) -> SiteConfig:
        """The site ``name``; :class:`FederationConfigError`, listing the known ones, if there is none."""
        return _named(self.sites, name, "site", FederationConfigError)

    def project(self, name: str) -> ProjectConfig:
        """The project ``name``; :class:`FederationConfigError`, listing the known ones, if there is none."""
        return _named(self.projects, name, "project", FederationConfigError)

    def projects_of(self, identity: str, groups: Collection[str] = ()) -> list[ProjectConfig]:
        """The projects ``identity`` is a member of (``groups``: the Globus Groups they belong to)."""
        return [p for p in self.projects if p.admits(identity, groups)]

    @property
    def uses_groups(self) -> bool:
        """Whether any project admits members by Globus Group (else nobody needs to ask Groups)."""
        return any(p.globus_group is not None for p in self.projects)


_Entry = TypeVar("_Entry", SiteConfig, ModelConfig, ProjectConfig)


def _named(entries: list[_Entry], name: str, what: str, error: type[TpmError], *, verb: str = "has") -> _Entry:
    """The entry called ``name``, or ``error`` naming every known one."""
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in entries) or "none"
    raise error(f"unknown {what} {name!r}; the federation {verb}: {known}")
