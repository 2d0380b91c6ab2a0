"""A token Globus Auth refused is not introspected again at every request.

Issue 24, suspected: failed introspections were not cached, so a client retrying a bad token (or
a flood of them) cost one call to Globus Auth per request, and Globus Auth rate-limits the
service's client for it. The service's real ``ConfidentialAppAuthClient`` talks HTTP to a stand-in
of Globus Auth that counts introspections.
"""

from __future__ import annotations

import httpx
import pytest

from tests.service_helpers import served_with_globus, token_answer

CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000c11e", "service-secret"


@pytest.fixture
def globus_service(assembly):
    tokens = {"good-token": token_answer("ana@uchicago.edu", CLIENT_ID),
              "inactive-token": token_answer("ana@uchicago.edu", CLIENT_ID, active=False),
              "other-audience-token": token_answer("ana@uchicago.edu", "some-other-service")}
    with served_with_globus(assembly, CLIENT_ID, SECRET, tokens) as served:
        yield served


def _models(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.mark.parametrize("bad", ["never-issued-token", "inactive-token", "other-audience-token"])
def test_a_hundred_requests_with_one_bad_token_cost_one_introspection(globus_service, bad):
    url, _, auth_server = globus_service
    answers = [_models(url, bad) for _ in range(100)]
    assert {a.status_code for a in answers} == {401}
    assert len({a.json()["error"]["message"] for a in answers}) == 1  # the same refusal, cached or not
    assert auth_server.introspections == 1


def test_a_good_token_is_unaffected_and_each_distinct_token_is_asked_once(globus_service):
    url, _, auth_server = globus_service
    assert _models(url, "good-token").status_code == 200
    for token in ("bad-1", "bad-2", "bad-1", "bad-2", "good-token"):
        _models(url, token)
    assert auth_server.introspections == 3


def test_the_caches_are_bounded(globus_service, monkeypatch):
    from tpm_fed.service import auth as auth_module

    url, auth, auth_server = globus_service
    monkeypatch.setattr(auth_module, "CACHED_TOKENS", 5)
    for index in range(20):
        assert _models(url, f"junk-{index}").status_code == 401
    assert auth_server.introspections == 20 and len(auth._refused) <= 5
