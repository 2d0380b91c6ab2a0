"""Logging in from the web page with Globus: the authorization code flow, run by the service.

The page's "Log in with Globus" link is ``GET /tpm/v1/auth/login``: the
service starts a flow with its own confidential client (globus-sdk's
``GlobusAuthorizationCodeFlowManager``) for the service's scope, remembers
its ``state`` (and sets it in a cookie, so the answer must come back to the
browser that asked), and sends the browser to Globus Auth. Globus Auth sends
it back to ``GET /tpm/v1/auth/callback`` with a code; the service checks the
state (once, within ten minutes), exchanges the code, checks the access token
as it checks every bearer token (active, unexpired, this service's audience),
and hands it to the page in the URL's fragment (``/#token=...``), which
browsers never send to a server: the page then signs in as it does from the
link ``tpm serve`` prints. The service keeps no session of its own.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from tpm_fed.protocol.errors import InvalidRequest, Unauthenticated

STATE_LIFETIME_S = 600.0
"""How long a started login may take to come back."""

STATE_COOKIE = "tpm-login-state"


class BrowserLogins:
    """Authorization code flows in progress, by state.

    Args:
        auth_client: The service's ``globus_sdk.ConfidentialAppAuthClient``.
        scope: The scope the page's token is for (the service's own).
        audience: The resource server whose token the page gets.
    """

    def __init__(self, auth_client: Any, scope: str, audience: str) -> None:
        self.auth_client = auth_client
        self.scope = scope
        self.audience = audience
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, redirect_uri: str) -> tuple[str, str]:
        """A new flow: the Globus Auth URL to send the browser to, and its state."""
        from globus_sdk.services.auth.flow_managers import GlobusAuthorizationCodeFlowManager

        state = secrets.token_urlsafe(24)
        now = time.time()
        with self._lock:
            for stale in [s for s, until in self._pending.items() if until <= now]:
                del self._pending[stale]
            self._pending[state] = now + STATE_LIFETIME_S
        flow = GlobusAuthorizationCodeFlowManager(self.auth_client, redirect_uri, self.scope, state=state)
        return flow.get_authorize_url(), state

    def finish(self, code: str, state: str, cookie_state: str | None, redirect_uri: str) -> str:
        """The access token for this service that ``code`` is worth.

        Raises:
            InvalidRequest: The state is unknown, used, expired, or not the browser's own.
            Unauthenticated: Globus Auth refused the code, or gave no token for this service.
        """
        import globus_sdk
        from globus_sdk.services.auth.flow_managers import GlobusAuthorizationCodeFlowManager

        with self._lock:
            until = self._pending.pop(state, None)  # once: a replayed answer finds nothing
        if until is None or until <= time.time() or not secrets.compare_digest(state, cookie_state or ""):
            raise InvalidRequest("this login answer is not one this browser started here (or it took over "
                                 "ten minutes, or it was used already): log in again")
        flow = GlobusAuthorizationCodeFlowManager(self.auth_client, redirect_uri, self.scope, state=state)
        try:
            tokens = flow.exchange_code_for_tokens(code)
        except globus_sdk.GlobusAPIError as error:
            raise Unauthenticated(f"Globus Auth refused the login code ({error.http_status})") from None
        except globus_sdk.NetworkError as error:
            raise Unauthenticated(f"Globus Auth could not be reached to finish the login: {error}") from None
        token = tokens.by_resource_server.get(self.audience, {}).get("access_token")
        if not token:
            raise Unauthenticated("Globus Auth gave no token for this service; log in again")
        return token
