"""Tokens the service holds to act for a caller at other Globus services (Globus Auth dependent tokens).

A caller's access token is for this service alone (its audience). To read
the caller's Globus Groups, or to submit Globus Compute tasks as the caller
(a bring-your-own site), the service exchanges that token with Globus Auth
for *dependent tokens*: tokens for the scopes the operator declared as
dependencies of the service's own scope when registering it
(``ConfidentialAppAuthClient.oauth2_get_dependent_tokens``).

The runtime knows callers by identity, not by token, so the authenticator
:meth:`remembers <DependentTokens.remember>` each caller's latest accepted
token (until it expires), and an exchange uses that one. Grants are cached
per caller token until they expire: one exchange serves a caller's many
requests, and a new login (a new token) gets fresh grants.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tpm_fed.protocol.errors import SiteError, Unauthenticated

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
COMPUTE_RESOURCE_SERVER = "funcx_service"
"""Globus Compute's resource server name in Globus Auth (its historical name)."""

EXPIRY_MARGIN_S = 60.0
"""A token this close to expiring is not handed out: a request may take that long to use it."""


@dataclass(frozen=True)
class DependentToken:
    """An access token for one resource server, obtained for one caller."""

    identity: str
    resource_server: str
    access_token: str
    expires_at: float


class DependentTokens:
    """Callers' current tokens, and what Globus Auth grants the service for each of them.

    Args:
        auth_client: The service's ``globus_sdk.ConfidentialAppAuthClient``.
        clock: Seconds since the epoch (tests pass their own).
    """

    def __init__(self, auth_client: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.auth_client = auth_client
        self._clock = clock
        self._callers: dict[str, tuple[str, float]] = {}  # identity -> (their latest token, its expiry)
        self._grants: dict[str, dict[str, DependentToken]] = {}  # sha256(caller token) -> resource server -> token
        self._lock = threading.Lock()

    def remember(self, identity: str, token: str, expires_at: float) -> None:
        """``token`` (accepted for ``identity`` until ``expires_at``) is the one to exchange for them."""
        with self._lock:
            held = self._callers.get(identity)
            if held is None or held[0] != token:
                self._callers[identity] = (token, expires_at)

    def token_for(self, identity: str, resource_server: str) -> DependentToken:
        """A current token to reach ``resource_server`` as ``identity``.

        Raises:
            Unauthenticated: The service holds no current token of theirs, or Globus Auth
                grants nothing for ``resource_server`` from it (they must log in again and consent).
            SiteError: Globus Auth could not be reached or failed.
        """
        now = self._clock()
        with self._lock:
            held = self._callers.get(identity)
        if held is None or held[1] <= now:
            raise Unauthenticated(f"the service holds no current token of {identity!r}: "
                                  "send the request again with a fresh token (`tpm login`)")
        token, _ = held
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            granted = self._grants.get(key, {}).get(resource_server)
        if granted is not None and granted.expires_at - EXPIRY_MARGIN_S > now:
            return granted
        grants = self._exchange(identity, token, now)
        with self._lock:
            self._grants[key] = grants
            for stale in [k for k, tokens in self._grants.items()
                          if all(t.expires_at <= now for t in tokens.values())]:
                del self._grants[stale]
        if resource_server not in grants:
            raise Unauthenticated(
                f"Globus Auth granted the service no {resource_server} token for {identity!r}: log in again "
                "(`tpm login --force`) and consent to what the service asks for"
            )
        return grants[resource_server]

    def _exchange(self, identity: str, token: str, now: float) -> dict[str, DependentToken]:
        import globus_sdk

        try:
            answer = self.auth_client.oauth2_get_dependent_tokens(token)
        except globus_sdk.GlobusAPIError as error:
            if error.http_status in (400, 401, 403):
                raise Unauthenticated(
                    f"Globus Auth would not let the service act for {identity!r} ({error.http_status} "
                    f"{error.code}): log in again (`tpm login --force`)"
                ) from None
            raise SiteError(f"Globus Auth failed to grant dependent tokens ({error.http_status} {error.code})") from None
        except globus_sdk.NetworkError as error:
            raise SiteError(f"Globus Auth could not be reached for dependent tokens: {error}") from None
        return {
            server: DependentToken(identity, server, str(data["access_token"]),
                                   float(data.get("expires_at_seconds") or now))
            for server, data in answer.by_resource_server.items()
        }
