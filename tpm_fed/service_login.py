"""Logging in to a tpm service that takes Globus Auth identities, and the token a Client then sends.

A shared service says, to anyone, how to log in to it (``GET /tpm/v1/auth``:
the native app client to log in with and the scope to ask for). ``tpm
login`` runs globus-sdk's own native-app login flow for that scope (a
``UserApp``: a URL to open, a code to paste) and keeps the tokens under
``$TPM_HOME/logins/<service>/``: ``tokens.json`` (globus-sdk's JSON token
storage, readable by its owner only) beside ``service.json`` (what the
service said, so a later process needs no second request to use them).

A :class:`~tpm_fed.client.Client` for that URL given no token sends the
stored access token; when it has expired the refresh token gets a new one
(globus-sdk's refresh authorizer, which stores it back). ``tpm logout``
revokes both and forgets them. Nothing here starts a login unasked: a
missing or revoked login is :class:`Unauthenticated`, saying what to run.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from tpm_fed.home import TpmHome
from tpm_fed.protocol.errors import InvalidRequest, SiteError, Unauthenticated


@dataclass(frozen=True)
class LoginSettings:
    """What a service says about logging in to it (``GET /tpm/v1/auth``)."""

    url: str
    mode: str
    client_id: str | None = None
    scope: str | None = None
    resource_server: str | None = None


def discover(url: str) -> LoginSettings:
    """Ask the service at ``url`` how to log in to it.

    Raises:
        SiteError: It could not be reached or did not answer as a tpm service.
    """
    url = url.rstrip("/")
    try:
        answer = httpx.get(f"{url}/tpm/v1/auth", timeout=30)
        answer.raise_for_status()
        said = answer.json()
    except (httpx.HTTPError, ValueError) as error:
        raise SiteError(f"could not ask {url} how to log in (GET /tpm/v1/auth): {error}") from None
    return LoginSettings(url=url, mode=str(said.get("mode")), client_id=said.get("client_id"),
                         scope=said.get("scope"), resource_server=said.get("resource_server"))


def login_folder(home: TpmHome, url: str) -> Path:
    """Where the login to ``url`` is kept: one folder per service."""
    return home.root / "logins" / re.sub(r"[^A-Za-z0-9.-]+", "_", url.rstrip("/"))


class ServiceLogin:
    """The stored login to one service: its settings and globus-sdk's ``UserApp`` over the token file.

    Thread-safe (``GlobusApp`` is not): a Client's requests run in a pool.
    """

    def __init__(self, settings: LoginSettings, folder: Path) -> None:
        if settings.mode != "globus":
            raise InvalidRequest(f"{settings.url} takes {settings.mode} identities: there is nothing to log in to "
                                 "(a local service's token is in its home's service.json)")
        if not settings.client_id or not settings.scope or not settings.resource_server:
            raise InvalidRequest(f"{settings.url} names no Globus Auth client to log in with: ask its operator "
                                 "to set TPM_SERVICE_LOGIN_CLIENT_ID")
        self.settings = settings
        self.folder = folder
        self._app: Any = None
        self._lock = threading.Lock()

    @classmethod
    def stored(cls, home: TpmHome, url: str) -> ServiceLogin | None:
        """The login ``tpm login`` stored for ``url``, if any (reads one small file; no network)."""
        folder = login_folder(home, url)
        try:
            said = json.loads((folder / "service.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(LoginSettings(**said), folder)

    def app(self) -> Any:
        """globus-sdk's ``UserApp`` for this service's scope, over this login's token file."""
        if self._app is None:
            import globus_sdk
            from globus_sdk.token_storage import JSONTokenStorage

            config = globus_sdk.GlobusAppConfig(
                token_storage=JSONTokenStorage(self.folder / "tokens.json"),
                request_refresh_tokens=True,  # a Client keeps working past the access token's two hours
                token_validation_error_handler=None,  # never start a login from inside a Client
            )
            self._app = globus_sdk.UserApp(
                "tpm-fed", client_id=self.settings.client_id,
                scope_requirements={self.settings.resource_server: [self.settings.scope]}, config=config,
            )
        return self._app

    def login(self, *, force: bool = False) -> None:
        """Run the native-app login flow (unless the stored tokens are still good) and keep what it gives."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.app().login(force=force)
        (self.folder / "service.json").write_text(json.dumps(asdict(self.settings)))

    def logged_in(self) -> bool:
        with self._lock:
            return not self.app().login_required()

    def authorization_header(self) -> str:
        """``Bearer ACCESS_TOKEN``, refreshed first if it has expired.

        Raises:
            Unauthenticated: Not logged in, or the refresh token was refused (revoked, expired).
        """
        import globus_sdk
        from globus_sdk.token_storage import TokenValidationError

        hint = f"run `tpm login --service {self.settings.url}`"
        with self._lock:
            try:
                header = self.app().get_authorizer(self.settings.resource_server).get_authorization_header()
            except TokenValidationError:
                raise Unauthenticated(f"not logged in to {self.settings.url}: {hint}") from None
            except globus_sdk.GlobusAPIError as error:
                raise Unauthenticated(f"the login to {self.settings.url} could not be renewed "
                                      f"({error.http_status} {error.code}): {hint}") from None
        if not header:
            raise Unauthenticated(f"not logged in to {self.settings.url}: {hint}")
        return header

    def logout(self) -> None:
        """Revoke the tokens with Globus Auth and forget them."""
        with self._lock:
            self.app().logout()
            self.app().close()
        shutil.rmtree(self.folder, ignore_errors=True)


class StoredLoginAuth(httpx.Auth):
    """httpx's hook for a stored login: every request gets the current (refreshed) access token."""

    def __init__(self, login: ServiceLogin) -> None:
        self.login = login

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = self.login.authorization_header()
        yield request


def stored_login_auth(home: TpmHome, url: str) -> StoredLoginAuth | None:
    """The auth a Client for ``url`` uses when given no token: the stored login, if there is one."""
    login = ServiceLogin.stored(home, url)
    return StoredLoginAuth(login) if login is not None else None
