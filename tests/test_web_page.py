"""The web page at ``/``, in a real headless browser: Debian's chromium and chromedriver, driven by Selenium.

The browser talks to the session's runtime over loopback exactly as a
person's would: it opens the sign-in link ``tpm service status`` prints,
sends a prompt from the playground, watches the streamed answer and its
charge appear, and finds that request and charge on the projects tab. The
service's own answers (HTTP, the ledger) are the oracle for what the page
shows. To see streaming without timing anything, the service's first event
stream is held open after its first text (:class:`StreamGate`): that text
must be on the page while the charge, in the last chunk, is not. Screenshots
go to each test's temporary folder (``screenshots/``).

Chromium missing is a failure, not a skip: ``scripts/install-servers.sh``
installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_helpers import ServiceThread
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

COLD_START_WAIT_S = 300
"""Explicit waits end as soon as their condition holds; a cold replica on a busy machine may take minutes."""

DATA_PATHS = re.compile(r"^/(v1|tpm/v1)/")
PUBLIC_PATHS = {"/tpm/v1/auth"}  # how to log in: public, holds no data


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/install-servers.sh (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    # The performance log lists every response the page received: how the tests see its data calls.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))
    driver.screenshots = tmp_path / "screenshots"
    driver.screenshots.mkdir()
    try:
        yield driver
    finally:
        driver.quit()


class StreamGate:
    """An ASGI wrapper that holds the first event stream back once some text has gone out, until released.

    So the test sees, without timing anything, that the page shows text that
    has arrived while its stream is still open (and its last chunk, with the
    charge, has not).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.holding = threading.Event()
        self.release = threading.Event()
        self.text_sent = ""
        self._used = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._used:
            await self.app(scope, receive, send)
            return
        streaming = False

        async def gated_send(message: dict) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                streaming = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
                self._used = self._used or streaming
            await send(message)
            if streaming and message["type"] == "http.response.body" and not self.holding.is_set():
                self.text_sent += _texts(message.get("body", b""))
                if self.text_sent:
                    self.holding.set()
                    await asyncio.to_thread(self.release.wait, COLD_START_WAIT_S)

        await self.app(scope, receive, gated_send)


def _texts(body: bytes) -> str:
    """The completion text carried by the server-sent events in ``body``."""
    text = ""
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            text += "".join(choice.get("text") or "" for choice in json.loads(line[6:]).get("choices", []))
    return text


@dataclass(frozen=True)
class GatedService:
    url: str
    token: str
    gate: StreamGate

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def gated_service(assembly, runtime) -> Iterator[GatedService]:
    """The session's runtime behind a service whose first event stream the test holds open."""
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    gate = StreamGate(build_app(assembly, LocalToken(token, runtime.owner)))
    with ServiceThread(gate) as url:
        yield GatedService(url, token, gate)
    gate.release.set()


def wait_for(driver: Any, condition: Any, timeout_s: float = 60, message: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition, message)


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    elements = driver.find_elements(By.CSS_SELECTOR, css)
    return elements[0].text if elements else ""


def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def open_tab(driver: Any, name: str) -> None:
    """Click a tab, wait until it has loaded (the page stamps the panel), and check it shows no error."""
    before = driver.execute_script(f"return document.getElementById('{name}').dataset.loaded || ''")
    click(driver, f"nav button[data-tab='{name}']")
    wait_for(driver, lambda d: d.execute_script(f"return document.getElementById('{name}').dataset.loaded || ''")
             not in ("", before), message=f"the {name} tab did not load")
    assert text_of(driver, f"#{name} .load-error") == ""


def responses(driver: Any) -> list[tuple[str, int]]:
    """(path, status) of every HTTP response the page received since the last call."""
    from urllib.parse import urlsplit

    found = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"].startswith("http"):
                found.append((urlsplit(response["url"]).path, int(response["status"])))
    return found


def data_calls(driver: Any) -> list[tuple[str, int]]:
    return [(path, status) for path, status in responses(driver)
            if DATA_PATHS.match(path) and path not in PUBLIC_PATHS]


def screenshot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(driver.screenshots / f"{name}.png"))


def sign_in_link(service: Any, tmp_path: Path) -> str:
    """The link ``tpm service status`` prints for a home whose service is ``service``."""
    from click.testing import CliRunner

    from tpm_fed.cli import main
    from tpm_fed.service.server import write_service_file

    home = TpmHome(tmp_path / "home")
    home.root.mkdir()
    write_service_file(home, {"url": service.url, "token": service.token, "pid": os.getpid()})
    printed = CliRunner().invoke(main, ["service", "status"], env={"TPM_HOME": str(home.root)})
    assert printed.exit_code == 0, printed.output
    found = re.search(r"^web page.*: (http://\S+)$", printed.output, re.MULTILINE)
    assert found, printed.output
    assert found.group(1) == f"{service.url}/#token={service.token}"
    return found.group(1)


def test_sign_in_by_link_then_a_streamed_answer_its_charge_and_that_charge_in_usage(gated_service, tmp_path,
                                                                                    browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    service = gated_service

    browser.get(sign_in_link(service, tmp_path))
    wait_for(browser, lambda d: text_of(d, "#who"), message="the token link did not sign in")
    assert "token" not in browser.current_url  # taken out of the address bar (and so of history)
    assert browser.execute_script("return sessionStorage.getItem('tpm-token')") == service.token

    cards = {card["id"]: card for card in httpx.get(f"{service.url}/v1/models", headers=service.headers).json()["data"]}
    demo = cards[DEMO_MODEL_NAME]["tpm"]
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-model='{DEMO_MODEL_NAME}']"))
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-model='{DEMO_MODEL_NAME}']")
    assert demo["version"][:12] in row.text
    for site, warmth in demo["sites"].items():
        assert row.find_element(By.CSS_SELECTOR, f".badge[data-site='{site}']").text == f"{site}: {warmth}"
    screenshot(browser, "models")

    open_tab(browser, "playground")
    Select(browser.find_element(By.ID, "pg-model")).select_by_value(DEMO_MODEL_NAME)
    prompt = "The cell divides"
    for field, value in (("pg-prompt", prompt), ("pg-max-tokens", "12"), ("pg-temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    click(browser, "#pg-send")
    # The stream is held open after its first text: that text is on the page, the charge not yet.
    answer_js = "return document.getElementById('pg-answer').textContent"
    wait_for(browser, lambda d: d.execute_script(answer_js), COLD_START_WAIT_S, "no streamed text appeared")
    assert browser.execute_script(answer_js) == service.gate.text_sent
    assert browser.find_element(By.ID, "pg-answer").get_attribute("data-state") == "streaming"
    assert text_of(browser, "#pg-charge") == ""
    service.gate.release.set()
    wait_for(browser, lambda d: text_of(d, "#pg-charge"), COLD_START_WAIT_S, "no charge appeared")
    screenshot(browser, "playground")

    answer = browser.execute_script(answer_js)
    request_id = text_of(browser, "#pg-request-id")
    record = httpx.get(f"{service.url}/tpm/v1/requests/{request_id}", headers=service.headers).json()
    assert record["status"] == "done" and record["model"] == DEMO_MODEL_NAME
    assert text_of(browser, "#pg-version") == record["version"] == demo["version"]
    charge_su = f"{record['charged_su']:.6f}"
    assert text_of(browser, "#pg-charge").startswith(f"{charge_su} SU to {record['project']}")
    assert text_of(browser, "#pg-usage") == (f"{record['prompt_tokens']} prompt + "
                                             f"{record['completion_tokens']} completion tokens")
    # Greedy, so the same prompt through the API (not streamed) gives the same text.
    again = httpx.post(f"{service.url}/v1/completions", headers=service.headers, timeout=COLD_START_WAIT_S,
                       json={"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert answer and answer == again.json()["choices"][0]["text"]

    open_tab(browser, "projects")
    usage_row = browser.find_element(By.CSS_SELECTOR, f"tr[data-request-id='{request_id}']")
    assert usage_row.find_element(By.CSS_SELECTOR, "td.charge").text == charge_su
    assert "done" in usage_row.text and record["version"][:12] in usage_row.text
    assert browser.find_elements(By.CSS_SELECTOR, f"#spending-chart path[data-project='{record['project']}']")
    screenshot(browser, "projects")

    open_tab(browser, "sites")
    site_row = browser.find_element(By.CSS_SELECTOR, f"tr[data-site='{record['site']}']")
    assert site_row.find_element(By.CSS_SELECTOR, ".badge").text == "running"
    assert record["site"] in text_of(browser, "#replicas-rows") and "warm" in text_of(browser, "#replicas-rows")
    slo = {row["kind"]: row for row in httpx.get(f"{service.url}/tpm/v1/slo", headers=service.headers).json()["kinds"]}
    generate = slo["generate"]
    assert generate["requests"] >= 2  # the page's and the test's own
    assert text_of(browser, "#slo-rows tr[data-kind='generate'] td:nth-child(2)") == (
        f"{generate['requests']} ({generate['refused']} refused, {generate['failed']} failed)")
    screenshot(browser, "sites")


def test_without_a_token_the_page_shows_sign_in_and_gets_no_data(service, browser):
    from selenium.webdriver.common.by import By

    page = httpx.get(f"{service.url}/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{service.url}/web/..%2Fserver.py").status_code == 404

    browser.get(f"{service.url}/")
    sign_in = browser.find_element(By.ID, "sign-in")
    wait_for(browser, lambda d: sign_in.is_displayed(), message="the sign-in form never showed")  # drawn by the script
    assert not browser.find_element(By.ID, "tabs").is_displayed()
    assert not browser.find_element(By.ID, "globus-login").is_displayed()  # local mode: the token link signs in
    assert browser.find_element(By.ID, "models-rows").text == ""
    assert data_calls(browser) == []

    browser.find_element(By.ID, "token-input").send_keys("not-the-token")
    click(browser, "#sign-in-form button")
    wait_for(browser, lambda d: text_of(d, "#sign-in-error"), message="a wrong token was not refused")
    assert "not this service's token" in text_of(browser, "#sign-in-error")
    assert data_calls(browser) == [("/tpm/v1/whoami", 401)]
    assert not browser.find_element(By.ID, "tabs").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('tpm-token')") is None
    screenshot(browser, "sign-in")


@dataclass(frozen=True)
class TokenTable:
    """Local-mode tokens for several identities (the embedded default has one; tests need a few)."""

    identities: dict[str, str]
    mode: str = "local"

    def known(self, token: str | None) -> str:
        return self.authenticate(token)  # a table lookup: never blocks

    def authenticate(self, token: str | None) -> str:
        from tpm_fed.protocol.errors import Unauthenticated

        if token not in self.identities:
            raise Unauthenticated("the bearer token is not this service's token")
        return self.identities[token]

    def login_info(self) -> dict[str, Any]:
        return {"mode": self.mode}


def test_an_operator_sees_every_project_and_a_stranger_none(assembly, runtime, service, browser):
    from selenium.webdriver.common.by import By

    from tpm_fed.service.app import build_app

    served = httpx.post(f"{service.url}/v1/completions", headers=service.headers, timeout=COLD_START_WAIT_S,
                        json={"model": DEMO_MODEL_NAME, "prompt": "A protein folds", "max_tokens": 4}).json()
    request_id, project = served["tpm"]["request_id"], served["tpm"]["charge"]["project"]
    operator, stranger = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    auth = TokenTable({operator: "ops@center", stranger: "stranger@elsewhere"})
    with ServiceThread(build_app(assembly, auth, operators=frozenset({"ops@center"}))) as url:
        browser.get(f"{url}/#token={operator}")
        wait_for(browser, lambda d: text_of(d, "#who") == "ops@center (operator)")
        open_tab(browser, "projects")
        assert text_of(browser, "#projects-title") == "Projects (operator: all)"
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-request-id='{request_id}']")
        assert project in row.text and runtime.owner in row.text
        assert project in text_of(browser, "#allocations-rows")

        click(browser, "#sign-out")
        wait_for(browser, lambda d: d.find_element(By.ID, "sign-in").is_displayed())
        browser.get(f"{url}/#token={stranger}")
        wait_for(browser, lambda d: text_of(d, "#who") == "stranger@elsewhere")
        open_tab(browser, "projects")
        assert text_of(browser, "#projects-scope") == "stranger@elsewhere is a member of no project."
        assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-request-id]")
        assert text_of(browser, "#allocations-rows") == "none"


def test_the_playground_chats_with_the_models_template_and_shows_a_refusal_clearly(service, browser):
    """Chat mode streams the same text as the chat route answers whole; a model with no template is refused."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{service.url}/#token={service.token}")
    wait_for(browser, lambda d: text_of(d, "#who"), message="the token link did not sign in")
    open_tab(browser, "playground")
    message = "Which way does the river run?"

    def ask(model: str) -> None:
        Select(browser.find_element(By.ID, "pg-mode")).select_by_value("chat")
        Select(browser.find_element(By.ID, "pg-model")).select_by_value(model)
        for field, value in (("pg-prompt", message), ("pg-max-tokens", "10"), ("pg-temperature", "0")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        click(browser, "#pg-send")

    ask("demo-chat")
    assert text_of(browser, "#pg-prompt-label") == "Message"
    wait_for(browser, lambda d: text_of(d, "#pg-charge"), COLD_START_WAIT_S, "no chat answer finished")
    answer = browser.execute_script("return document.getElementById('pg-answer').textContent")
    whole = httpx.post(f"{service.url}/v1/chat/completions", headers=service.headers, timeout=COLD_START_WAIT_S,
                       json={"model": "demo-chat", "messages": [{"role": "user", "content": message}],
                             "max_tokens": 10, "temperature": 0}).json()
    assert answer and answer == whole["choices"][0]["message"]["content"]  # greedy: the same turn
    assert text_of(browser, "#pg-error") == ""

    ask(DEMO_MODEL_NAME)  # no chat template: refused before anything runs, and the page says why
    wait_for(browser, lambda d: text_of(d, "#pg-error"), COLD_START_WAIT_S, "the refusal was not shown")
    assert "chat template" in text_of(browser, "#pg-error")
    assert text_of(browser, "#pg-state") == "failed"
    screenshot(browser, "playground-chat")
