"""A project: users spending service units together."""

from __future__ import annotations

from collections.abc import Collection
from typing import Self
from uuid import UUID

from pydantic import Field, model_validator

from tpm_fed.federation.base import Name, _Strict


class ProjectConfig(_Strict):
    """A group of users spending service units together.

    Attributes:
        name: Unique project name.
        members: Identities (the OS user name in the embedded default).
        allocations: Service units granted per site name.
        globus_group: A Globus Group (its UUID) whose members are members too, on a
            service with Globus Auth identities (the group's own managers then keep the
            list, not the federation file). Ignored with local identities.
    """

    name: str = Name
    members: list[str] = Field(default_factory=list)
    allocations: dict[str, float] = Field(default_factory=dict)
    globus_group: UUID | None = None

    def admits(self, identity: str, groups: Collection[str] = ()) -> bool:
        """Whether ``identity`` is a member: listed, or in this project's group (``groups``: theirs)."""
        return identity in self.members or (self.globus_group is not None and str(self.globus_group) in groups)

    @model_validator(mode="after")
    def _grants_not_negative(self) -> Self:
        for site, amount in self.allocations.items():
            if amount < 0:
                raise ValueError(f"project {self.name!r}: allocation at {site!r} is negative")
        return self
