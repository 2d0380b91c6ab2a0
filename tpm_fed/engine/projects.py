"""Who may charge which project: listed members, or members of a project's Globus Group."""

from __future__ import annotations

from collections.abc import Callable

from tpm_fed.federation import Federation
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted
from tpm_fed.engine.interface import Callers


class Projects:
    """Project membership in the federation served now (``federation()``), asking ``callers`` for groups."""

    def __init__(self, federation: Callable[[], Federation], callers: Callers) -> None:
        self._federation, self.callers = federation, callers

    def project_for(self, identity: str, asked: str | None) -> str:
        """The project ``identity`` charges (``asked``, or their only project)."""
        if asked is not None:
            if not self._member_of(identity, asked):
                raise NotPermitted(f"{identity!r} is not a member of project {asked!r}")
            return asked
        mine = self.projects_of(identity)
        if not mine:
            raise NotPermitted(f"{identity!r} is not a member of any project of this federation")
        if len(mine) > 1:
            raise InvalidRequest(f"project: {identity!r} is in several projects ({', '.join(mine)}); name one")
        return mine[0]

    def projects_of(self, identity: str) -> list[str]:
        """The projects ``identity`` is a member of: listed, or by Globus Group (asked only if a project has one)."""
        federation = self._federation()
        groups = self.callers.groups_of(identity) if federation.uses_groups else frozenset()
        return [project.name for project in federation.projects_of(identity, groups)]

    def _member_of(self, identity: str, name: str) -> bool:
        """Whether ``identity`` may charge project ``name`` (Groups is asked only when the list does not say)."""
        project = next((p for p in self._federation().projects if p.name == name), None)
        if project is None:
            return False
        if identity in project.members or project.globus_group is None:
            return identity in project.members
        return project.admits(identity, self.callers.groups_of(identity))

    def all_projects(self) -> list[str]:
        return [project.name for project in self._federation().projects]
