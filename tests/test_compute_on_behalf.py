"""A bring-your-own Globus Compute site is reached as the caller; a shared one as the service.

The service runs for real on loopback in Globus Auth mode. Its Globus
Compute traffic goes through the real SDK down to HTTP, answered by
:class:`tests.compute_service.ComputeService` (tasks run on a real
``GlobusComputeEngine``), which also plays Globus Auth: token introspection,
the service's own client-credentials login, and the dependent-token grant
that turns a caller's token for the service into a Globus Compute token for
that caller. Each submission is recorded with the ``Authorization`` header
it carried.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from tests.compute_service import ACCESS_TOKEN, AUTH, ComputeService, answering_the_sdk
from tests.service_helpers import ServiceThread, token_answer, tpm_in_process
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome

pytestmark = pytest.mark.slow

CLIENT_ID, SECRET = "5b5b1a5e-0000-4000-8000-00000000c11e", "service-secret"
ANA, BO = "ana@uchicago.edu", "bo@anl.gov"
TOKENS = {"ana-token": token_answer(ANA, CLIENT_ID), "bo-token": token_answer(BO, CLIENT_ID),
          "ungranted-token": token_answer(BO, CLIENT_ID)}
GRANTS = {"ana-token": "compute-as-ana", "bo-token": "compute-as-bo"}  # what Globus Auth grants the service


@pytest.fixture(scope="module")
def compute(tmp_path_factory):
    service = ComputeService(run_dir=tmp_path_factory.mktemp("endpoint"))
    service.start()
    yield service
    service.stop()


@pytest.fixture
def cloud(compute, monkeypatch, tmp_path):
    """Globus Compute and Globus Auth at the HTTP boundary; the service logged in with client credentials."""
    compute.dependent_grants.clear()
    compute.dependent_grants.update(GRANTS)
    with answering_the_sdk(compute, monkeypatch, tmp_path / "globus") as mock:
        mock.add_callback("POST", f"{AUTH}/v2/oauth2/token/introspect", callback=_introspect)
        yield compute


def _introspect(request):
    token = parse_qs(request.body)["token"][0]
    return 200, {}, json.dumps(TOKENS.get(token, {"active": False}))


@pytest.fixture
def served(cloud, tmp_path, demo_model_dir, monkeypatch):
    """A federation with lab's own endpoint (byo) and a shared one (rcc), both Globus Compute, served."""
    import globus_sdk

    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import GlobusTokens
    from tpm_fed.service.callers import GlobusCallers
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    lab_endpoint, shared_endpoint = cloud.add_endpoint(), cloud.add_endpoint()
    Federation(
        name="on-behalf",
        sites=[
            # A long linger: were the two callers' requests one batch, they would be one task.
            SiteConfig(name="lab-cluster", billing="byo", owner="lab", access="globus-compute",
                       endpoint_id=lab_endpoint, batch_linger_ms=800, cold_start_s=1.0),
            SiteConfig(name="rcc", access="globus-compute", endpoint_id=shared_endpoint, cold_start_s=1.0),
        ],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="lab", members=[ANA, BO]),
                  ProjectConfig(name="astro", members=[ANA], allocations={"rcc": 100.0})],
    ).dump(home.federation_file)
    for site in ("lab-cluster", "rcc"):  # an operator registers the serving function, with the service's login
        registered = tpm_in_process(home.root, monkeypatch, "functions", "register", "--site", site)
        assert registered.exit_code == 0, registered.output
    auth = GlobusTokens(CLIENT_ID, auth_client=globus_sdk.ConfidentialAppAuthClient(CLIENT_ID, SECRET))
    assembly = ServiceAssembly(home, callers=GlobusCallers(auth.dependent_tokens))
    try:
        with ServiceThread(build_app(assembly, auth)) as url:
            yield url, lab_endpoint, shared_endpoint
    finally:
        assembly.close()


def _complete(url: str, token: str, prompt: str, **tpm: str) -> httpx.Response:
    body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0, **tpm}
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300)


def _prompts_of(submission: dict) -> list[str]:
    """Every prompt the submission's tasks carry (the tasks' arguments, as the SDK packed them)."""
    from globus_compute_sdk.serialize import ComputeSerializer

    serializer = ComputeSerializer()
    prompts = []
    for payloads in submission["tasks"].values():
        for payload in payloads:
            args, _ = [serializer.deserialize(part) for part in serializer.unpack_buffers(payload)]
            _, requests, _ = args
            prompts += [prompt for request in requests for prompt in request["prompts"]]
    return prompts


def test_byo_tasks_go_out_as_each_caller_and_shared_ones_as_the_service(cloud, served):
    url, lab_endpoint, shared_endpoint = served
    asks = {"ana-token": "Ana's telescope", "bo-token": "Bo's microscope"}
    with ThreadPoolExecutor(2) as pool:  # at once: a shared dispatcher would batch them together
        answers = dict(zip(asks, pool.map(lambda item: _complete(url, item[0], item[1], project="lab",
                                                                 site="lab-cluster"), asks.items())))
    for token, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert answer.json()["tpm"]["site"] == "lab-cluster"

    to_lab = [s for s in cloud.submissions if s["endpoint_id"] == lab_endpoint]
    as_whom = {f"Bearer {GRANTS[token]}": [prompt] for token, prompt in asks.items()}
    assert sorted(s["authorization"] for s in to_lab) == sorted(as_whom)  # one submission each, as themselves
    for submission in to_lab:
        assert _prompts_of(submission) == as_whom[submission["authorization"]]  # never another caller's task
        assert submission.get("task_group_id") is None  # a task group of its own, never another caller's

    shared = _complete(url, "ana-token", "A shared question", project="astro", site="rcc")
    assert shared.status_code == 200, shared.text
    [to_rcc] = [s for s in cloud.submissions if s["endpoint_id"] == shared_endpoint]
    assert to_rcc["authorization"] == f"Bearer {ACCESS_TOKEN}"  # the service's own client credentials
    assert _prompts_of(to_rcc) == ["A shared question"]
    assert to_rcc.get("task_group_id") is None


def test_a_caller_the_service_cannot_act_for_is_refused_and_nothing_is_submitted(cloud, served):
    url, lab_endpoint, _ = served
    refused = _complete(url, "ungranted-token", "Bo's microscope", project="lab", site="lab-cluster")
    assert refused.status_code == 401 and "tpm login --force" in refused.json()["error"]["message"]
    assert [s for s in cloud.submissions if s["endpoint_id"] == lab_endpoint] == []
