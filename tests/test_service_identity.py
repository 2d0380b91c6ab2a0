"""Identities on a shared service: Globus Auth tokens, projects, allocations, and who may read what.

The service introspects tokens with globus-sdk's real ``ConfidentialAppAuthClient``,
answered over HTTP by a stand-in of Globus Auth's introspection route.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import served_with_globus, token_answer
from tests.test_web_page import browser  # noqa: F401 - the headless browser fixture
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome

CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000c11e", "service-secret"
ANA, BO, CY = "ana@uchicago.edu", "bo@anl.gov", "cy@lbl.gov"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, demo_model_dir):
    """A shared service in globus auth mode: projects astro (ana) and bio (bo, a small grant)."""
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path_factory.mktemp("shared-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="shared",
        sites=[SiteConfig(name="local")],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="astro", members=[ANA], allocations={"local": 100.0}),
                  ProjectConfig(name="bio", members=[BO], allocations={"local": 0.1})],
    ).dump(home.federation_file)
    tokens = {
        "ana-token": token_answer(ANA, CLIENT_ID),
        "bo-token": token_answer(BO, CLIENT_ID),
        "cy-token": token_answer(CY, CLIENT_ID),
        "expired-token": token_answer(ANA, CLIENT_ID, lifetime_s=-10),
        "inactive-token": token_answer(ANA, CLIENT_ID, active=False),
        "other-audience-token": token_answer(ANA, "some-other-service"),
    }
    with ServiceAssembly(home) as assembly, served_with_globus(assembly, CLIENT_ID, SECRET, tokens) as (url, _, auth_server):
        runtime = assembly.engine
        yield url, runtime, auth_server


def _post(url, token, body, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def _get(url, token, path):
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=60)


ASK = {"model": DEMO_MODEL_NAME, "prompt": "The cell", "max_tokens": 6, "temperature": 0}


def test_two_identities_share_one_warm_replica_and_each_pays_its_own(shared):
    url, runtime, _ = shared
    first = _post(url, "ana-token", ASK).json()["tpm"]
    second = _post(url, "bo-token", {**ASK, "max_tokens": 1}).json()["tpm"]
    assert second["replica"] == first["replica"] and second["warm"] and second["load_s"] == 0
    charges = {c.request_id: c for c in runtime.ledger.statement()}
    ana, bo = charges[first["request_id"]], charges[second["request_id"]]
    assert (ana.identity, ana.project) == (ANA, "astro") and (bo.identity, bo.project) == (BO, "bio")
    assert ana.charged_usu == round(first["charge"]["charged_su"] * 1e6)
    assert bo.charged_usu == round(second["charge"]["charged_su"] * 1e6)
    usage = {c["request_id"] for c in _get(url, "ana-token", "/tpm/v1/usage").json()["charges"]}
    assert first["request_id"] in usage and second["request_id"] not in usage


def test_nobody_reads_another_identitys_requests_or_usage(shared):
    url, _, _ = shared
    mine = _post(url, "ana-token", ASK).json()["tpm"]["request_id"]
    assert _get(url, "ana-token", f"/tpm/v1/requests/{mine}").status_code == 200
    assert _get(url, "bo-token", f"/tpm/v1/requests/{mine}").status_code == 403
    assert _get(url, "bo-token", "/tpm/v1/usage?project=astro").status_code == 403
    assert _get(url, "bo-token", "/tpm/v1/allocations?project=astro").status_code == 403


def test_a_member_of_one_project_cannot_spend_anothers_allocation(shared):
    url, runtime, _ = shared
    before = len(runtime.ledger.statement())
    answer = _post(url, "ana-token", {**ASK, "project": "bio"})
    assert answer.status_code == 403 and "not a member of project 'bio'" in answer.json()["error"]["message"]
    outsider = _post(url, "cy-token", ASK)
    assert outsider.status_code == 403 and "not a member of any project" in outsider.json()["error"]["message"]
    assert len(runtime.ledger.statement()) == before


@pytest.mark.parametrize(("token", "says"), [
    (None, "no bearer token"),
    ("made-up-token", "not active"),
    ("inactive-token", "not active"),
    ("expired-token", "expired"),
    ("other-audience-token", "another service"),
])
def test_missing_and_bad_tokens_are_401(shared, token, says):
    url, _, _ = shared
    answer = _post(url, token, ASK)
    assert answer.status_code == 401 and says in answer.json()["error"]["message"]


def test_an_over_balance_request_is_refused_with_nothing_charged(shared):
    url, runtime, _ = shared
    before = [(b.spent_usu, b.reserved_usu) for b in runtime.ledger.balances("bio")]
    answer = _post(url, "bo-token", {**ASK, "max_tokens": 200})
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "insufficient_quota"
    assert [(b.spent_usu, b.reserved_usu) for b in runtime.ledger.balances("bio")] == before


def test_a_token_is_introspected_once_until_it_expires(shared):
    url, _, auth_server = shared
    _get(url, "ana-token", "/tpm/v1/whoami")
    seen = auth_server.introspections
    for _ in range(3):
        assert _get(url, "ana-token", "/tpm/v1/whoami").json()["identity"] == ANA
    assert auth_server.introspections == seen


def _log_in_with_globus(url: str) -> tuple[httpx.Client, httpx.Response]:
    """A browser's round trip: the page's login link, Globus Auth, back to the service's callback."""
    browser = httpx.Client(timeout=30)
    start = browser.get(f"{url}/tpm/v1/auth/login")
    assert start.status_code == 302 and "/v2/oauth2/authorize?" in start.headers["location"]
    at_globus = browser.get(start.headers["location"])
    assert at_globus.status_code == 302 and at_globus.headers["location"].startswith(f"{url}/tpm/v1/auth/callback?")
    return browser, browser.get(at_globus.headers["location"])


def test_the_page_logs_in_with_globus_and_gets_a_token_for_this_service(shared):
    url, _, auth_server = shared
    browser, back = _log_in_with_globus(url)
    assert back.status_code == 302 and back.headers["location"].startswith("/#token=")
    token = back.headers["location"].removeprefix("/#token=")
    assert token in auth_server.tokens  # a token Globus Auth issued, for this service's audience
    me = httpx.get(f"{url}/tpm/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["identity"] == ANA

    # The same answer again (a replay, or someone else's stolen redirect) gets nothing.
    replay = browser.get(back.request.url)
    assert replay.status_code == 400 and "not one this browser started" in replay.text
    assert "#token=" not in replay.headers.get("location", "")


def test_a_globus_login_answer_must_come_back_to_the_browser_that_asked(shared):
    url, _, _ = shared
    asker = httpx.Client(timeout=30)
    start = asker.get(f"{url}/tpm/v1/auth/login")
    callback = httpx.get(start.headers["location"]).headers["location"]  # followed by someone else
    other_browser = httpx.get(callback)  # no state cookie: not the browser that started it
    assert other_browser.status_code == 400 and "#token=" not in other_browser.headers.get("location", "")
    denied = asker.get(f"{url}/tpm/v1/auth/callback", params={"error": "access_denied", "state": "x"})
    assert denied.status_code == 400 and "access_denied" in denied.text


def test_a_local_service_has_no_globus_login(service):
    refused = httpx.get(f"{service.url}/tpm/v1/auth/login")
    assert refused.status_code == 400 and "local mode" in refused.json()["error"]["message"]


def test_the_page_in_a_browser_logs_in_with_globus(shared, browser):
    from selenium.webdriver.common.by import By

    from tests.test_web_page import click, text_of, wait_for

    url, _, _ = shared
    browser.get(f"{url}/")
    link = browser.find_element(By.ID, "globus-login")
    wait_for(browser, lambda d: link.is_displayed(), message="no 'Log in with Globus' on a Globus-mode page")
    click(browser, "#globus-login-link")
    wait_for(browser, lambda d: text_of(d, "#who") == ANA, message="the Globus login did not sign the page in")
    assert browser.find_element(By.ID, "tabs").is_displayed()
    assert "token=" not in browser.current_url  # the page took the token out of the address bar
    browser.save_screenshot(str(browser.screenshots / "globus-login.png"))
