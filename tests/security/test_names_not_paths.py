"""A model reference is a name, never a path: no caller reads a file of the service's host through one.

The reproductions of issue 24 (defect 3), through the HTTP service: a store-backed model asked for
as ``astro-llm@/etc/passwd`` answered with the file's first bytes in its error, and a ``../../``
version sent to the quote route came back as a 500 carrying the whole of ``service.log``. Both are
refused at the edge now (4xx, nothing of the file in the answer), and an error nobody foresaw is a
500 that carries only an id, which the operator's log has with the detail.
"""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from tests.service_helpers import served
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.store import ModelStore

SECRET = ("tpm: serving /root/.tpm at http://127.0.0.1:1 (auth: local)\n"
          "tpm: web page (this link signs you in): http://127.0.0.1:1/#token=do-not-leak-this-token")
TRAVERSALS = ["/etc/passwd", "../../../../service.log", "../../../../../../../../etc/passwd", ".hidden",
              "..", "v1\x00", "a/b"]


@pytest.fixture(scope="module")
def store_service(tmp_path_factory, demo_model_dir):
    """A home serving ``astro-llm`` from its model store, with a service.log holding a sign-in link."""
    from tpm_fed.service.assembly import ServiceAssembly

    root = tmp_path_factory.mktemp("names-home")
    home = TpmHome(root)
    ModelStore(root / "store").import_dir(demo_model_dir, "astro-llm")
    Federation(
        name="names", sites=[SiteConfig(name="local")],
        models=[ModelConfig(name="astro-llm", store=True, backend="torch")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    (root / "service.log").write_text(SECRET + "\n" * 5)
    with ServiceAssembly(home) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        yield runtime, url, {"Authorization": f"Bearer {token}"}


def _leaks(answer: httpx.Response) -> list[str]:
    """What of /etc/passwd or of service.log an answer carries (the caller's own text may be echoed)."""
    text = answer.text
    return [mark for mark in ("root:", "tpm: serving", "do-not-leak", "#token=", "signs you in", "/bin/")
            if mark in text]


@pytest.mark.parametrize("version", TRAVERSALS)
def test_a_path_as_a_version_is_refused_on_the_completion_route(store_service, version):
    _, url, headers = store_service
    answer = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                        json={"model": f"astro-llm@{version}", "prompt": "The cell", "max_tokens": 2})
    assert 400 <= answer.status_code < 500, answer.text
    assert _leaks(answer) == []


@pytest.mark.parametrize("version", TRAVERSALS)
def test_a_path_as_a_version_is_refused_on_the_quote_routes(store_service, version):
    _, url, headers = store_service
    native = httpx.post(f"{url}/tpm/v1/quotes", headers=headers, timeout=30,
                        json={"kind": "generate", "model": {"name": "astro-llm", "version": version},
                              "prompts": ["The cell"], "max_new_tokens": 2})
    batch_api = httpx.post(f"{url}/v1/quotes", headers=headers, timeout=30,
                           json={"body": {"model": f"astro-llm@{version}", "prompt": "The cell", "max_tokens": 2}})
    for answer in (native, batch_api):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "InvalidRequest"
        assert _leaks(answer) == []


@pytest.mark.parametrize("name", ["../../../etc", "/etc/passwd", ".store"])
def test_a_path_as_a_model_name_is_refused(store_service, name):
    _, url, headers = store_service
    answer = httpx.post(f"{url}/tpm/v1/quotes", headers=headers, timeout=30,
                        json={"kind": "generate", "model": {"name": name}, "prompts": ["x"], "max_new_tokens": 2})
    assert answer.status_code == 400 and _leaks(answer) == [], answer.text


def test_a_path_as_an_adapter_is_refused(store_service):
    _, url, headers = store_service
    answer = httpx.post(f"{url}/tpm/v1/quotes", headers=headers, timeout=30,
                        json={"kind": "embed", "model": {"name": "astro-llm"}, "inputs": [],
                              "texts": [], "input_module": "../../../../service.log", "head": None})
    assert answer.status_code == 400 and "input_module" in answer.text and _leaks(answer) == [], answer.text


def test_a_good_version_still_resolves(store_service):
    runtime, url, headers = store_service
    version = ModelStore(runtime.federation.store).resolve("astro-llm")
    answer = httpx.post(f"{url}/tpm/v1/quotes", headers=headers, timeout=30,
                        json={"kind": "generate", "model": {"name": "astro-llm", "version": version[:12]},
                              "prompts": ["The cell"], "max_new_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_the_store_refuses_a_path_even_past_the_edge(tmp_path, demo_model_dir):
    """Defense in depth: the store's own path building stays under its root whatever it is handed."""
    from tpm_fed.protocol.errors import InvalidRequest
    from tpm_fed.protocol.names import path_under

    store = ModelStore(tmp_path / "store")
    store.import_dir(demo_model_dir, "astro-llm")
    (tmp_path / "outside").write_text("secret")
    for bad in ("../../../outside", "/etc/passwd"):
        with pytest.raises(InvalidRequest):
            store._tag_target("astro-llm", bad)
    with pytest.raises(InvalidRequest):
        path_under(tmp_path / "store", "models", "..", "..", "outside")


def test_an_unexpected_error_is_an_opaque_500_whose_id_is_in_the_log(store_service, monkeypatch, caplog):
    runtime, url, headers = store_service

    def broken(*args, **kwargs):
        raise OSError(f"[Errno 36] File name too long: '/srv/store/manifests/{SECRET}.json'")

    monkeypatch.setattr(runtime, "quote", broken)
    with caplog.at_level(logging.ERROR):
        answer = httpx.post(f"{url}/tpm/v1/quotes", headers=headers, timeout=30,
                            json={"kind": "generate", "model": {"name": "astro-llm"}, "prompts": ["x"],
                                  "max_new_tokens": 2})
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["code"] == "InternalError" and _leaks(answer) == [] and "Errno" not in answer.text
    error_id = re.fullmatch(r"internal error (err-[0-9a-f]{16}): .*", error["message"]).group(1)
    logged = [record for record in caplog.records if error_id in record.getMessage()]
    assert logged and "File name too long" in "".join(logging.Formatter().formatException(r.exc_info)
                                                        for r in logged if r.exc_info)
