"""A Globus Compute site, through the real SDK down to the wire.

The SDK's ``Client`` and ``Executor`` run unmodified: they build real HTTP
requests (intercepted by ``responses`` and answered by
:class:`tests.compute_service.ComputeService`, whose tasks run on a real
``GlobusComputeEngine``), and results come back through the SDK's own result
handling. Only the AMQP socket is replaced (see tests/compute_service.py).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from tests.compute_service import (
    ComputeService,
    answering_the_sdk,
    use_user_login,
)
from tests.service_helpers import tpm_in_process
from tpm_fed.service.runtime import Runtime
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.errors import (
    FederationConfigError,
    FunctionNotRegistered,
    NotLoggedIn,
    PlacementRefused,
    RemoteExecutionError,
)
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, RegisteredFunction, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.sites.globus_compute import GlobusComputeSite

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent.parent / "scripts"
USER_ENDPOINT_CONFIG = {"account": "m0000", "partition": "gpu", "walltime": "01:00:00", "nodes": 1}
RESOURCES = {"priority": 7}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = ComputeService(run_dir=tmp_path_factory.mktemp("endpoint"))
    service.start()
    yield service
    service.stop()


@pytest.fixture
def cloud(service, monkeypatch, tmp_path):
    """The service answering the SDK's HTTP calls, a service identity logged in, AMQP in-process."""
    with answering_the_sdk(service, monkeypatch, tmp_path / "globus"):
        yield service


@pytest.fixture(scope="module")
def gc_home(tmp_path_factory, demo_model_dir):
    """A federation whose demo model is served by a local site and a Globus Compute site."""
    home = TpmHome(tmp_path_factory.mktemp("gc-home"))
    home.models_dir.mkdir(parents=True)
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    return home


def write_federation(home: TpmHome, endpoint_id: str, **gc_fields) -> None:
    Federation(
        name="gc-tests",
        sites=[
            SiteConfig(name="local", cold_start_s=60.0),  # far costlier than the remote site: placed second
            SiteConfig(name="gc", access="globus-compute", endpoint_id=endpoint_id, cold_start_s=1.0,
                       user_endpoint_config=USER_ENDPOINT_CONFIG, resource_specification=RESOURCES, **gc_fields),
        ],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                            kinds=["generate", "trace"])],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()],
                                allocations={"local": 1e6, "gc": 1e6})],
    ).dump(home.federation_file)


def tpm(home: TpmHome, monkeypatch, *args: str):
    """Run ``tpm`` in this process, so ``responses`` sees the SDK's requests (its service stopped after)."""
    return tpm_in_process(home.root, monkeypatch, *args)


def test_registered_function_serves_through_the_sdk_executor(cloud, gc_home, monkeypatch):
    endpoint_id = cloud.add_endpoint()
    write_federation(gc_home, endpoint_id)

    registered = tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc")
    assert registered.exit_code == 0, registered.output
    recorded = Federation.load(gc_home.federation_file).site("gc").functions["serve_batch"]
    assert recorded.code_version == serving_code_version()
    body = cloud.functions[str(recorded.function_id)]
    assert body["function_name"] == "serve_batch"

    again = tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc")
    assert "up to date" in again.output and len(cloud.functions) == 1  # same code: same id

    prompts = ["The telescope", "A star"]
    with Runtime(gc_home) as runtime:
        remote = runtime.generate(prompts, max_new_tokens=6, project="tests").result(timeout=120)
        local = runtime.generate(prompts, max_new_tokens=6, project="tests", site="local").result(timeout=120)
        balances = {b.site: b for b in runtime.ledger.balances() if b.project == "tests"}

    assert remote.site == "gc" and local.site == "local"
    assert remote.token_ids == local.token_ids  # greedy: the same tokens through either path
    assert remote.version == local.version
    assert balances["gc"].spent_usu == round(remote.charge.charged_su * 1e6) > 0
    assert balances["gc"].reserved_usu == 0

    [submission] = cloud.submissions
    assert submission["endpoint_id"] == endpoint_id
    assert list(submission["tasks"]) == [str(recorded.function_id)]
    assert submission["user_endpoint_config"] == USER_ENDPOINT_CONFIG
    assert submission["resource_specification"] == RESOURCES
    from globus_compute_sdk.serialize import ComputeSerializer

    [payload] = submission["tasks"][str(recorded.function_id)]
    serializer = ComputeSerializer()
    args, kwargs = [serializer.deserialize(part) for part in serializer.unpack_buffers(payload)]
    model, requests, context = args
    assert model["name"] == DEMO_MODEL_NAME and model["version"] == remote.version
    assert [r["prompts"] for r in requests] == [prompts] and kwargs == {}
    assert context["code_version"] == serving_code_version()


def test_remote_exception_reaches_the_caller_typed_with_its_message(cloud):
    from tests.helpers import raise_value_error
    from tpm_fed.globus_auth import compute_client

    endpoint_id = cloud.add_endpoint()
    function_id = compute_client().register_function(raise_value_error)
    site = GlobusComputeSite(SiteConfig(
        name="gc", access="globus-compute", endpoint_id=endpoint_id,
        functions={"raise_value_error": RegisteredFunction(function_id=function_id,
                                                           code_version=serving_code_version())},
    ))
    try:
        future = site.submit(raise_value_error, "the spectrometer is not calibrated")
        error = future.exception(timeout=60)
    finally:
        site.shutdown()
    assert isinstance(error, RemoteExecutionError)
    assert "ValueError: the spectrometer is not calibrated" in str(error)
    assert "raise_value_error" in error.remote_traceback


def test_function_not_registered_or_changed_is_refused_unsent_and_uncharged(cloud, gc_home, monkeypatch):
    endpoint_id = cloud.add_endpoint()
    write_federation(gc_home, endpoint_id)
    with Runtime(gc_home) as runtime:
        before = runtime.ledger.balances()
        error = runtime.generate("The telescope", max_new_tokens=4, project="tests", site="gc").exception(60)
        assert isinstance(error, FunctionNotRegistered) and "tpm functions register --site gc" in str(error)
        assert runtime.ledger.balances() == before

    stale = RegisteredFunction(function_id=uuid.uuid4(), code_version="0123456789abcdef")
    write_federation(gc_home, endpoint_id, functions={"serve_batch": stale})
    with Runtime(gc_home) as runtime:
        error = runtime.generate("The telescope", max_new_tokens=4, project="tests", site="gc").exception(60)
    assert isinstance(error, FunctionNotRegistered) and "0123456789abcdef" in str(error)
    assert cloud.submissions == []  # nothing reached the service
    listed = tpm(gc_home, monkeypatch, "functions", "list")
    assert "stale: register again" in listed.output


def test_endpoint_that_does_not_allow_the_function_is_a_typed_refusal(cloud, gc_home, monkeypatch):
    endpoint_id = cloud.add_endpoint(allowed_functions=[])
    write_federation(gc_home, endpoint_id)
    assert tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc").exit_code == 0
    with Runtime(gc_home) as runtime:
        before = runtime.ledger.balances()
        error = runtime.generate("The telescope", max_new_tokens=4, project="tests", site="gc").exception(60)
        assert runtime.ledger.balances() == before
    assert isinstance(error, FunctionNotRegistered)
    assert "FUNCTION_NOT_PERMITTED" in str(error) and "allowed_functions" in str(error)


def test_offline_endpoint_is_skipped_by_the_broker_or_named_in_the_refusal(cloud, gc_home, monkeypatch):
    endpoint_id = cloud.add_endpoint(status="offline")
    write_federation(gc_home, endpoint_id)
    assert tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc").exit_code == 0
    with Runtime(gc_home) as runtime:
        rerouted = runtime.generate("The telescope", max_new_tokens=4, project="tests").result(timeout=120)
        with pytest.raises(PlacementRefused, match=f"endpoint {endpoint_id} is offline"):
            runtime.generate("The telescope", max_new_tokens=4, project="tests", site="gc")
    assert rerouted.site == "local"
    assert cloud.submissions == []


def test_not_logged_in_says_run_tpm_login_and_never_prompts(gc_home, monkeypatch, tmp_path):
    use_user_login(monkeypatch, tmp_path / "no-tokens")
    write_federation(gc_home, str(uuid.uuid4()))
    with Runtime(gc_home) as runtime, responses.RequestsMock() as no_network:
        with pytest.raises(NotLoggedIn, match="run `tpm login`"):
            runtime.generate("The telescope", max_new_tokens=4, project="tests", site="gc")
        assert len(no_network.calls) == 0  # it asked nobody, and waited for no one
    result = tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc")
    assert result.exit_code == 1 and "NotLoggedIn" in result.output and "tpm login" in result.output


def test_login_runs_the_sdk_flow_and_logout_revokes(cloud, gc_home, monkeypatch, tmp_path):
    from tpm_fed.globus_auth import logged_in

    use_user_login(monkeypatch, tmp_path / "person")
    assert not logged_in()
    first = CliRunner().invoke(_main(), ["login"], input="code-pasted-from-the-browser\n")
    assert first.exit_code == 0, first.output
    assert "https://auth.globus.org/v2/oauth2/authorize" in first.output and "logged in" in first.output
    assert logged_in()
    assert "already logged in" in CliRunner().invoke(_main(), ["login"]).output

    out = CliRunner().invoke(_main(), ["logout"])
    assert out.exit_code == 0 and "logged out" in out.output
    assert "tpm-test-access-token" in cloud.revoked
    assert not logged_in()


def _main():
    from tpm_fed.cli import main

    return main


@pytest.mark.parametrize("bad", ["not-a-uuid", "1234", ""])
def test_endpoint_id_must_be_a_uuid(gc_home, monkeypatch, bad):
    write_federation(gc_home, str(uuid.uuid4()))
    result = tpm(gc_home, monkeypatch, "sites", "add", "hpc", "--endpoint", bad)
    assert result.exit_code != 0
    assert "endpoint_id" in result.output or "--endpoint" in result.output

    raw = json.loads(json.dumps(Federation.load(gc_home.federation_file).model_dump(mode="json")))
    raw["sites"][1]["endpoint_id"] = bad or "x"
    (gc_home.root / "broken.yaml").write_text(json.dumps(raw))
    with pytest.raises(FederationConfigError, match="endpoint_id"):
        Federation.load(gc_home.root / "broken.yaml")


def test_live_endpoint_script_runs_against_the_service(cloud, tmp_path, capsys, monkeypatch):
    """scripts/live_endpoint.py: plain SDK Executor by id, Parsl's GlobusComputeExecutor, typed refusals."""
    import importlib.util

    monkeypatch.chdir(tmp_path)  # Parsl writes its runinfo/ here

    spec = importlib.util.spec_from_file_location("live_endpoint", SCRIPTS / "live_endpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    endpoint_id = cloud.add_endpoint()
    status = script.main(["--endpoint", endpoint_id, "--endpoint-folder", str(tmp_path / "at-endpoint"),
                          "--timeout", "300"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert printed.count("PASS") == 4 and "FAIL" not in printed
    assert all(s["endpoint_id"] == endpoint_id for s in cloud.submissions)

    with pytest.raises(SystemExit):
        script.main(["--endpoint", "not-a-uuid"])
