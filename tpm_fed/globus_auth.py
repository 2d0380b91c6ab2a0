"""Globus credentials for Globus Compute: the SDK's own login flow and token storage.

``tpm login`` and ``tpm logout`` use the same ``GlobusApp`` the Globus
Compute SDK builds for itself, so tokens are shared with the SDK and the
``globus-compute-endpoint`` command (stored under ``~/.globus_compute``, or
``$GLOBUS_COMPUTE_USER_DIR``). A service identity can log in with no
browser: set ``GLOBUS_COMPUTE_CLIENT_ID`` and ``GLOBUS_COMPUTE_CLIENT_SECRET``.

Nothing here ever starts an interactive login unasked: a site that needs
credentials this machine lacks raises :class:`~tpm_fed.errors.NotLoggedIn`.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.errors import NotLoggedIn

LOGIN_HINT = (
    "Globus Compute needs credentials: run `tpm login` (or set GLOBUS_COMPUTE_CLIENT_ID and "
    "GLOBUS_COMPUTE_CLIENT_SECRET for a service identity)"
)


def _client_and_app(environment: str | None = None) -> tuple[Any, Any]:
    """A Globus Compute ``Client`` and its app; the client's scopes are now the app's requirements."""
    from globus_compute_sdk import Client
    from globus_compute_sdk.sdk.auth.globus_app import get_globus_app

    try:
        app = get_globus_app(environment=environment)
    except ValueError as error:  # half of a client identity in the environment
        raise NotLoggedIn(str(error)) from None
    return Client(environment=environment, app=app, do_version_check=False), app


def logged_in(environment: str | None = None) -> bool:
    """Whether the stored tokens (or a service identity) cover Globus Compute."""
    _, app = _client_and_app(environment)
    return not app.login_required()


def compute_client(environment: str | None = None) -> Any:
    """A Globus Compute ``Client`` that will not ask for a login.

    Raises:
        NotLoggedIn: No usable credentials; the message says to run ``tpm login``.
    """
    client, app = _client_and_app(environment)
    if app.login_required():
        raise NotLoggedIn(LOGIN_HINT)
    return client


def login(environment: str | None = None, *, force: bool = False) -> None:
    """Run the SDK's login flow (a URL to open, then a code to paste) unless already logged in."""
    _, app = _client_and_app(environment)
    app.login(force=force)


def logout(environment: str | None = None) -> None:
    """Revoke and forget this machine's Globus Compute tokens."""
    _, app = _client_and_app(environment)
    app.logout()
