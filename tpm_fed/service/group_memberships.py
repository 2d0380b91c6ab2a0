"""Which Globus Groups a caller belongs to, asked of the Groups API as the caller.

A project may admit the members of a Globus Group (``globus_group`` in the
federation file) besides those it lists. Groups answers "my groups" only to
the member themself, so the service asks with the caller's own dependent
token for the Groups scope (:mod:`tpm_fed.service.dependent_tokens`). The
answer is cached for :data:`MEMBERSHIP_TTL_S` at most (never past the token's
expiry): someone removed from a group loses the project within that time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tpm_fed.protocol.errors import SiteError
from tpm_fed.service.dependent_tokens import GROUPS_RESOURCE_SERVER, DependentTokens

MEMBERSHIP_TTL_S = 300.0
"""How long a caller's group list is trusted before Groups is asked again."""


class GroupMemberships:
    """A caller's active Globus Group memberships (group UUIDs as strings).

    Args:
        tokens: Where the caller's Groups token comes from.
        groups_client: Makes a ``globus_sdk.GroupsClient`` from an authorizer (tests point it elsewhere).
        clock: Seconds since the epoch.
    """

    def __init__(self, tokens: DependentTokens, *, groups_client: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens = tokens
        self._groups_client = groups_client or _default_groups_client
        self._clock = clock
        self._cache: dict[str, tuple[frozenset[str], float]] = {}
        self._lock = threading.Lock()

    def groups_of(self, identity: str) -> frozenset[str]:
        """The groups ``identity`` is an active member of.

        Raises:
            Unauthenticated: The service cannot act for them (no current token, no consent).
            SiteError: Globus Auth or Groups could not be reached, or refused the service.
        """
        now = self._clock()
        with self._lock:
            cached = self._cache.get(identity)
        if cached is not None and cached[1] > now:
            return cached[0]
        token = self.tokens.token_for(identity, GROUPS_RESOURCE_SERVER)
        groups = self._ask(identity, token.access_token)
        with self._lock:
            self._cache[identity] = (groups, min(token.expires_at, now + MEMBERSHIP_TTL_S))
        return groups

    def _ask(self, identity: str, access_token: str) -> frozenset[str]:
        import globus_sdk

        client = self._groups_client(globus_sdk.AccessTokenAuthorizer(access_token))
        try:
            answer = client.get_my_groups(statuses="active")
        except globus_sdk.GlobusAPIError as error:
            raise SiteError(f"Globus Groups answered {error.http_status} {error.code} when asked for the "
                            f"groups of {identity!r}; project membership by group cannot be checked now") from None
        except globus_sdk.NetworkError as error:
            raise SiteError(f"Globus Groups could not be reached to check the groups of {identity!r}: {error}") from None
        return frozenset(
            str(group["id"]) for group in answer
            if any(m.get("status", "active") == "active" for m in group.get("my_memberships") or [{}])
        )


def _default_groups_client(authorizer: Any) -> Any:
    import globus_sdk

    return globus_sdk.GroupsClient(authorizer=authorizer)
