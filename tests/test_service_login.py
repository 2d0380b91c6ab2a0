"""``tpm login`` for a service's own scope, the stored token a Client sends, its refresh, ``tpm logout``.

The service runs for real on loopback in Globus Auth mode. Everything that
talks to Globus Auth (the service's introspection, the CLI's native-app
login flow, the Client's refresh, the revocation on logout) is globus-sdk
making real HTTP requests, answered at that boundary with ``responses``.
"""

from __future__ import annotations

import json
import os
import stat
import time
from urllib.parse import parse_qs

import pytest
import responses
from click.testing import CliRunner

from tests.compute_service import _signing_key
from tests.service_helpers import ServiceThread, token_answer
from tpm_fed.federation import Federation, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.protocol.errors import Unauthenticated

AUTH = "https://auth.globus.org"
CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000c11e", "service-secret"
NATIVE_CLIENT_ID = "7d7e3c1a-0000-4000-8000-0000000c1100"  # the app users log in with
SCOPE = f"https://auth.globus.org/scopes/{CLIENT_ID}/all"
ANA = "ana@uchicago.edu"


class GlobusAuth:
    """Globus Auth's token, introspection, revocation and key routes, with the tokens it issued."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.active: dict[str, str] = {}  # access token -> identity
        self.refresh_tokens = {"refresh-1"}
        self.issued = 0
        self.introspected: list[str] = []
        self.revoked: list[str] = []
        self.grants: list[str] = []
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token", callback=self._token)
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token/introspect", callback=self._introspect)
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token/revoke", callback=self._revoke)
        mock.add("GET", f"{AUTH}/.well-known/openid-configuration", json={
            "issuer": AUTH, "jwks_uri": f"{AUTH}/jwk.json", "id_token_signing_alg_values_supported": ["RS512"]})
        mock.add("GET", f"{AUTH}/jwk.json", json={"keys": [_signing_key().public_jwk]})

    @staticmethod
    def _form(request) -> dict[str, str]:
        return {key: values[0] for key, values in parse_qs(request.body).items()}

    def _service_token(self) -> dict:
        self.issued += 1
        access = f"service-access-{self.issued}"
        self.active[access] = ANA
        return {"access_token": access, "refresh_token": "refresh-1", "expires_in": 7200,
                "resource_server": CLIENT_ID, "scope": SCOPE, "token_type": "Bearer"}

    def _token(self, request):
        form = self._form(request)
        self.grants.append(form["grant_type"])
        if form["grant_type"] == "authorization_code" and form.get("code") == "code-from-the-browser":
            return 200, {}, json.dumps({
                "access_token": "auth-access", "refresh_token": "auth-refresh", "expires_in": 7200,
                "resource_server": "auth.globus.org", "scope": "openid", "token_type": "Bearer",
                "id_token": _signing_key().id_token(audience=form["client_id"]),
                "other_tokens": [self._service_token()],
            })
        if form["grant_type"] == "refresh_token" and form.get("refresh_token") in self.refresh_tokens:
            return 200, {}, json.dumps({**self._service_token(), "other_tokens": []})
        return 400, {}, json.dumps({"error": "invalid_grant"})

    def _introspect(self, request):
        token = self._form(request)["token"]
        self.introspected.append(token)
        identity = self.active.get(token)
        return 200, {}, json.dumps(token_answer(identity, CLIENT_ID) if identity else {"active": False})

    def _revoke(self, request):
        token = self._form(request)["token"]
        self.revoked.append(token)
        self.active.pop(token, None)
        self.refresh_tokens.discard(token)
        return 200, {}, json.dumps({"active": False})


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A service in Globus Auth mode (no model needed), and a caller's own empty tpm home."""
    import globus_sdk

    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import GlobusTokens
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path / "service-home")
    home.root.mkdir()
    Federation(name="shared", sites=[SiteConfig(name="local")],
               projects=[ProjectConfig(name="astro", members=[ANA])]).dump(home.federation_file)
    caller_home = TpmHome(tmp_path / "caller-home")
    monkeypatch.setenv("TPM_HOME", str(caller_home.root))
    for name in ("TPM_URL", "TPM_TOKEN", "GLOBUS_SDK_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        auth = GlobusAuth(mock)
        tokens = GlobusTokens(CLIENT_ID, auth_client=globus_sdk.ConfidentialAppAuthClient(CLIENT_ID, SECRET),
                              login_client_id=NATIVE_CLIENT_ID)
        assembly = ServiceAssembly(home)
        try:
            with ServiceThread(build_app(assembly, tokens)) as url:
                yield url, caller_home, auth
        finally:
            assembly.close()


def _tpm(*args: str, input: str | None = None):
    from tpm_fed.cli import main

    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def _token_file(caller_home: TpmHome, url: str):
    from tpm_fed.service_login import login_folder

    return login_folder(caller_home, url) / "tokens.json"


def _log_in(url: str):
    result = _tpm("login", "--service", url, input="code-from-the-browser\n")
    assert result.exit_code == 0, result.output
    return result


def test_the_service_says_how_to_log_in_to_anyone(shared):
    import httpx

    url, _, _ = shared
    answer = httpx.get(f"{url}/tpm/v1/auth")  # no token
    assert answer.status_code == 200
    assert answer.json() == {"mode": "globus", "client_id": NATIVE_CLIENT_ID, "scope": SCOPE,
                             "resource_server": CLIENT_ID}


def test_tpm_login_stores_the_services_token_and_a_client_sends_it(shared):
    from tpm_fed.client import Client

    url, caller_home, auth = shared
    output = _log_in(url).output
    assert f"{AUTH}/v2/oauth2/authorize" in output and f"client_id={NATIVE_CLIENT_ID}" in output
    assert "logged in to" in output
    tokens = _token_file(caller_home, url)
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o600  # only its owner reads it
    assert "service-access-1" in tokens.read_text()
    assert "already logged in" in _tpm("login", "--service", url).output

    with Client(url=url) as client:  # no token given: the stored login
        assert client.whoami()["identity"] == ANA
    assert auth.introspected[-1] == "service-access-1"


def test_an_expired_access_token_is_refreshed_and_stored_again(shared):
    from tpm_fed.client import Client

    url, caller_home, auth = shared
    _log_in(url)
    tokens = _token_file(caller_home, url)
    stored = json.loads(tokens.read_text())
    for entry in stored["data"]["DEFAULT"].values():
        if entry["resource_server"] == CLIENT_ID:
            entry["expires_at_seconds"] = int(time.time()) - 10
    tokens.write_text(json.dumps(stored))

    with Client(url=url) as client:
        assert client.whoami()["identity"] == ANA
    assert auth.grants[-1] == "refresh_token"
    assert auth.introspected[-1] == "service-access-2"  # the new token went to the service
    assert "service-access-2" in tokens.read_text()


def test_logout_revokes_and_then_the_cli_says_to_log_in(shared, monkeypatch):
    from tpm_fed.client import Client

    url, caller_home, auth = shared
    _log_in(url)
    out = _tpm("logout", "--service", url)
    assert out.exit_code == 0 and "logged out" in out.output
    assert {"service-access-1", "refresh-1"} <= set(auth.revoked)
    assert not _token_file(caller_home, url).exists()

    with Client(url=url) as client, pytest.raises(Unauthenticated, match="tpm login"):
        client.whoami()
    monkeypatch.setenv("TPM_URL", url)
    refused = _tpm("submit", "The telescope", "--max-tokens", "4")
    assert refused.exit_code == 1
    assert "Unauthenticated" in refused.output and "tpm login" in refused.output


def test_a_refused_refresh_says_to_log_in_again(shared):
    from tpm_fed.client import Client

    url, caller_home, auth = shared
    _log_in(url)
    tokens = _token_file(caller_home, url)
    stored = json.loads(tokens.read_text())
    for entry in stored["data"]["DEFAULT"].values():
        entry["expires_at_seconds"] = int(time.time()) - 10
    tokens.write_text(json.dumps(stored))
    auth.refresh_tokens.clear()  # revoked elsewhere

    with Client(url=url) as client, pytest.raises(Unauthenticated, match=f"tpm login --service {url}"):
        client.whoami()


def test_plain_login_without_a_service_is_the_globus_compute_login(shared, monkeypatch):
    from tpm_fed import globus_auth

    calls = []
    monkeypatch.setattr(globus_auth, "logged_in", lambda: False)
    monkeypatch.setattr(globus_auth, "login", lambda force=False: calls.append(force))
    url, _, _ = shared
    assert "logged in to Globus Compute" in _tpm("login").output  # no TPM_URL: nothing else to log in to
    monkeypatch.setenv("TPM_URL", url)
    assert "logged in to Globus Compute" in _tpm("login", "--compute").output
    assert calls == [False, False]
