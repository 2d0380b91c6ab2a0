"""The operator's side of the Python API: ``Client().admin`` calls ``/tpm/v1/admin`` over HTTP.

The service checks that the caller is an operator (``NotPermitted``
otherwise) and validates every change against the whole federation
(``FederationConfigError`` or ``InvalidRequest`` naming the field, with
nothing changed). A change takes effect in the running service at once.

Example:
    >>> with Client() as client:
    ...     client.admin.add_project("astro", members=["ana@uchicago.edu"])
    ...     client.admin.grant("astro", "polaris", 500)
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import quote


class _Caller(Protocol):
    def _call(self, method: str, path: str, **options: Any) -> Any: ...


class Admin:
    """The operator routes, through a :class:`~tpm_fed.client.Client`'s pooled connection."""

    def __init__(self, client: _Caller) -> None:
        self._client = client

    def _call(self, method: str, path: str, **options: Any) -> Any:
        return self._client._call(method, f"/tpm/v1/admin{path}", **options)

    # ----- projects ---------------------------------------------------------------
    def projects(self) -> list[dict[str, Any]]:
        """Every project with its members and grants (SUs per site)."""
        return self._call("GET", "/projects")["projects"]

    def add_project(self, name: str, members: Iterable[str] = (),
                    allocations: dict[str, float] | None = None) -> dict[str, Any]:
        return self._call("POST", "/projects", json={"name": name, "members": list(members),
                                                      "allocations": allocations or {}})

    def remove_project(self, name: str) -> dict[str, Any]:
        """Remove a project (requests it placed finish; its statement stays)."""
        return self._call("DELETE", f"/projects/{_part(name)}")

    def add_member(self, project: str, identity: str) -> dict[str, Any]:
        return self._call("POST", f"/projects/{_part(project)}/members", json={"identity": identity})

    def remove_member(self, project: str, identity: str) -> dict[str, Any]:
        return self._call("DELETE", f"/projects/{_part(project)}/members/{_part(identity)}")

    def grant(self, project: str, site: str, service_units: float) -> dict[str, Any]:
        """Add ``service_units`` to ``project``'s allocation at ``site`` (negative to take back)."""
        return self._call("POST", f"/projects/{_part(project)}/grants",
                          json={"site": site, "service_units": service_units})

    # ----- sites ------------------------------------------------------------------
    def sites(self) -> list[dict[str, Any]]:
        """Every site's configuration (``Client.sites()`` has their running state)."""
        return self._call("GET", "/sites")["sites"]

    def add_site(self, config: dict[str, Any]) -> dict[str, Any]:
        """A new site; ``config`` has the fields of a site in the federation file."""
        return self._call("POST", "/sites", json=config)

    def replace_site(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """A site's new configuration (the old one drains and stops)."""
        return self._call("PUT", f"/sites/{_part(name)}", json=config)

    def remove_site(self, name: str) -> dict[str, Any]:
        """Remove a site; it drains (requests it has finish) and stops."""
        return self._call("DELETE", f"/sites/{_part(name)}")

    # ----- models -----------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        """Every model's configuration, current version, and stored versions with their tags."""
        return self._call("GET", "/models")["models"]

    def add_model(self, config: dict[str, Any]) -> dict[str, Any]:
        """A model entry (``path`` on the service's machine, or ``store: true``)."""
        return self._call("POST", "/models", json=config)

    def tag(self, model: str, tag: str, version: str = "latest", *, move: bool = False) -> dict[str, Any]:
        """Point ``tag`` at a stored version of ``model``."""
        return self._call("POST", f"/models/{_part(model)}/tags", json={"tag": tag, "version": version, "move": move})

    # ----- adapters ---------------------------------------------------------------
    def adapters(self) -> list[dict[str, Any]]:
        return self._call("GET", "/adapters")["adapters"]

    def register_adapter(self, name: str, architecture: dict[str, Any], weights: bytes,
                         description: str = "") -> dict[str, Any]:
        """Register ``weights`` (a .safetensors file's bytes) under ``name``; the answer has its ``ref``."""
        return self._call("POST", "/adapters", json={
            "name": name, "architecture": architecture, "description": description,
            "weights": base64.b64encode(weights).decode(),
        })


def _part(text: str) -> str:
    """One path segment, whatever the name holds (an identity may hold '@' or '/')."""
    return quote(text, safe="")
