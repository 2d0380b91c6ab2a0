"""What the runtime asks about a caller besides their name: their groups, and how to submit as them.

The authenticator turns a token into an identity (a name, as member lists
and the ledger use). Two decisions need more than the name, and this small
protocol is where the runtime asks for it:

- project membership by Globus Group (``globus_group`` on a project);
- submitting to a bring-your-own Globus Compute site as the caller (their
  own account on their own allocation), not as the service.

Local identities (the embedded default, in-process use) have neither:
:class:`LocalCallers`. A Globus Auth deployment answers both with dependent
tokens obtained from the caller's token: :class:`GlobusCallers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tpm_fed.engine.interface import Callers  # noqa: F401  (what the classes here answer)
from tpm_fed.service.dependent_tokens import DependentTokens


class LocalCallers:
    """No groups; Globus Compute sites use this machine's own login (the home's owner)."""

    def groups_of(self, identity: str) -> frozenset[str]:
        return frozenset()

    def compute_client_factory(self, identity: str) -> Callable[[], Any] | None:
        return None


class GlobusCallers:
    """Groups and Globus Compute as the caller, through their dependent tokens.

    Args:
        tokens: The callers' tokens (the authenticator remembers each one it accepts).
        groups_client: Makes a ``globus_sdk.GroupsClient`` from an authorizer (default: the real one).
    """

    def __init__(self, tokens: DependentTokens, *, groups_client: Callable[[Any], Any] | None = None) -> None:
        from tpm_fed.service.group_memberships import GroupMemberships

        self.tokens = tokens
        self.memberships = GroupMemberships(tokens, groups_client=groups_client)

    def groups_of(self, identity: str) -> frozenset[str]:
        return self.memberships.groups_of(identity)

    def compute_client_factory(self, identity: str) -> Callable[[], Any] | None:
        from tpm_fed.service.on_behalf import compute_client_for

        return lambda: compute_client_for(self.tokens, identity)
