"""Project membership by Globus Group, checked as the caller with a dependent token.

The service runs for real on loopback in Globus Auth mode; its globus-sdk
clients (introspection, the dependent-token grant, Groups' "my groups") make
real HTTP requests, answered at that boundary with ``responses`` from the
SDK's own canned Groups data (``globus_sdk.testing``).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import httpx
import pytest
import responses
from globus_sdk.testing import get_response_set

from tests.service_helpers import ServiceThread, token_answer
from tpm_fed.federation import Federation, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.protocol.errors import NotPermitted

CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000c11e", "service-secret"
AUTH, GROUPS = "https://auth.globus.org", "https://groups.api.globus.org"
ANA, BO, DEE, EVE, GIL, HAL = "ana@uchicago.edu", "bo@anl.gov", "dee@anl.gov", "eve@lbl.gov", "gil@ornl.gov", \
    "hal@nersc.gov"
CANNED_GROUPS = get_response_set("groups.get_my_groups").lookup("default")
ASTRO_GROUP = CANNED_GROUPS.metadata["group_ids"][0]  # dee is in it (the canned answer is dee's)
NO_GRANT = "hal-token"  # Globus Auth refuses to exchange this one


class GlobusStandIn:
    """Globus Auth and Groups as the service's SDK clients reach them."""

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.tokens = {f"{name.split('@')[0]}-token": token_answer(name, CLIENT_ID)
                       for name in (ANA, BO, DEE, EVE, GIL, HAL)}
        self.groups_calls: list[str] = []  # the Authorization header of each "my groups" call
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token/introspect", callback=self._introspect)
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token", callback=self._dependent_tokens)
        mock.add_callback("GET", f"{GROUPS}/v2/groups/my_groups", callback=self._my_groups)

    @staticmethod
    def _form(request) -> dict[str, str]:
        return {key: values[0] for key, values in parse_qs(request.body).items()}

    def _introspect(self, request):
        return 200, {}, json.dumps(self.tokens.get(self._form(request)["token"], {"active": False}))

    def _dependent_tokens(self, request):
        form = self._form(request)
        assert form["grant_type"] == "urn:globus:auth:grant_type:dependent_token"
        if form["token"] == NO_GRANT or form["token"] not in self.tokens:
            return 400, {}, json.dumps({"error": "invalid_grant"})
        return 200, {}, json.dumps([{
            "resource_server": "groups.api.globus.org", "access_token": f"groups-for-{form['token']}",
            "expires_in": 3600, "token_type": "bearer",
            "scope": "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships",
        }])

    def _my_groups(self, request):
        authorization = request.headers.get("Authorization", "")
        self.groups_calls.append(authorization)
        if authorization == "Bearer groups-for-dee-token":
            return 200, {}, json.dumps(CANNED_GROUPS.json)
        if authorization == "Bearer groups-for-gil-token":
            return 502, {}, json.dumps({"code": "BAD_GATEWAY", "message": "upstream unavailable"})
        return 200, {}, "[]"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Project astro lists ana and admits ASTRO_GROUP's members; bio lists bo only (no model: nothing runs)."""
    import globus_sdk

    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import GlobusTokens
    from tpm_fed.service.callers import GlobusCallers
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path_factory.mktemp("groups-home"))
    Federation(
        name="groups",
        sites=[SiteConfig(name="local")],
        projects=[ProjectConfig(name="astro", members=[ANA], globus_group=ASTRO_GROUP, allocations={"local": 100.0}),
                  ProjectConfig(name="bio", members=[BO], allocations={"local": 100.0})],
    ).dump(home.federation_file)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        globus = GlobusStandIn(mock)
        auth = GlobusTokens(CLIENT_ID, auth_client=globus_sdk.ConfidentialAppAuthClient(CLIENT_ID, SECRET))
        assembly = ServiceAssembly(home, callers=GlobusCallers(auth.dependent_tokens))
        runtime = assembly.engine
        try:
            with ServiceThread(build_app(assembly, auth)) as url:
                yield url, globus, runtime
        finally:
            assembly.close()


def _whoami(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/tpm/v1/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _allocations(url: str, token: str, project: str) -> httpx.Response:
    """A project's balances: only its members may read them."""
    return httpx.get(f"{url}/tpm/v1/allocations", params={"project": project},
                     headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_a_member_of_the_projects_group_is_a_member_asked_with_their_dependent_token(service):
    url, globus, runtime = service
    assert _whoami(url, "dee-token").json()["projects"] == ["astro"]
    answer = _allocations(url, "dee-token", "astro")
    assert answer.status_code == 200 and [b["site"] for b in answer.json()["allocations"]] == ["local"]
    assert runtime.project_for(DEE, "astro") == "astro"  # what a request charged to astro is checked by
    assert runtime.project_for(DEE, None) == "astro"  # their only project
    # Groups saw the token Globus Auth granted the service for dee: never dee's own, never the service's.
    assert set(globus.groups_calls) == {"Bearer groups-for-dee-token"}
    assert _allocations(url, "dee-token", "bio").status_code == 403  # the group is astro's only
    with pytest.raises(NotPermitted, match="not a member of project 'bio'"):
        runtime.project_for(DEE, "bio")


def test_someone_neither_listed_nor_in_the_group_is_refused(service):
    url, _, runtime = service
    assert _whoami(url, "eve-token").json()["projects"] == []
    answer = _allocations(url, "eve-token", "astro")
    assert answer.status_code == 403
    assert "not a member of project 'astro'" in answer.json()["error"]["message"]
    with pytest.raises(NotPermitted, match="not a member of project 'astro'"):
        runtime.project_for(EVE, "astro")


def test_a_listed_member_is_admitted_without_asking_groups(service):
    url, globus, runtime = service
    _whoami(url, "bo-token")  # the service now holds bo's and ana's tokens
    _whoami(url, "ana-token")
    before = len(globus.groups_calls)
    assert runtime.project_for(BO, "bio") == "bio"
    assert runtime.project_for(ANA, "astro") == "astro"
    assert len(globus.groups_calls) == before


def test_memberships_are_cached_between_requests(service):
    url, globus, _ = service
    _whoami(url, "dee-token")
    asked = len(globus.groups_calls)
    for _ in range(3):
        assert _allocations(url, "dee-token", "astro").status_code == 200
    assert len(globus.groups_calls) == asked


def test_groups_failing_is_503_and_a_refused_exchange_is_401(service):
    url, _, _ = service
    down = _allocations(url, "gil-token", "astro")
    assert down.status_code == 503
    assert "Globus Groups answered 502" in down.json()["error"]["message"]
    refused = _allocations(url, NO_GRANT, "astro")
    assert refused.status_code == 401
    assert "tpm login --force" in refused.json()["error"]["message"]


def test_local_identities_use_the_member_lists_alone():
    federation = Federation(sites=[SiteConfig(name="local")],
                            projects=[ProjectConfig(name="astro", members=[ANA], globus_group=ASTRO_GROUP)])
    assert [p.name for p in federation.projects_of(DEE)] == []
    assert [p.name for p in federation.projects_of(DEE, {ASTRO_GROUP})] == ["astro"]
    assert [p.name for p in federation.projects_of(ANA)] == ["astro"]
