"""A worker is not trusted: what it sends back is data, and a pool without the site's keys cannot join.

Issue 24, defect 1: a rogue pool registered with the local site's
unencrypted interchange, took other users' tasks, and answered with an
object whose unpickling ran code inside the service. Here the rogue is real
code in a real worker: :func:`answer_with_a_pickle` replaces its worker's
result serializer with dill for one result (as a modified worker, or a byo
endpoint's owner, can) and returns an object that writes a marker file when
it is unpickled. The service must refuse that result, typed, without
unpickling it, through every way a site is reached: the endpoint engine run
by the service (local and parsl sites) and the Globus Compute SDK.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from functions.serve import echo
from tests.compute_service import ComputeService, answering_the_sdk
from tpm_fed.federation import RegisteredFunction, SiteConfig
from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.errors import ResultNotData
from tpm_fed.sites.globus_compute import GlobusComputeSite
from tpm_fed.sites.json_results import JSON_RESULTS
from tpm_fed.sites.local import LocalSite

pytestmark = pytest.mark.slow


class RunsWhenUnpickled:
    """A result whose unpickling writes ``path``: code the rogue wants run in the service."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran inside the service"))


def answer_with_a_pickle(marker: str) -> RunsWhenUnpickled:
    """Runs in a worker: its next result goes back dill-pickled, whatever serializer was asked for."""
    from globus_compute_sdk.serialize import ComputeSerializer
    from globus_compute_sdk.serialize.concretes import DillDataBase64

    honest = ComputeSerializer.__dict__["serialize_from_list"]

    def pickled(data, strategies):
        ComputeSerializer.serialize_from_list = honest  # one result only: the worker stays usable
        return DillDataBase64().serialize(data)

    ComputeSerializer.serialize_from_list = staticmethod(pickled)
    return RunsWhenUnpickled(marker)


def the_payload_is_real(marker: Path) -> None:
    """Unpickled, the rogue's result does leave its mark (here, on purpose, in this process)."""
    from globus_compute_sdk.serialize.concretes import DillDataBase64

    strategy = DillDataBase64()
    strategy.deserialize(strategy.serialize(RunsWhenUnpickled(str(marker))))
    assert marker.read_text() == "ran inside the service"


@pytest.fixture(scope="module")
def local_site(tmp_path_factory):
    site = LocalSite("rogue-target", run_dir=tmp_path_factory.mktemp("rogue-target") / "run")
    yield site
    site.shutdown()


# -- (a) the endpoint engine run by the service: local and parsl sites ---------------------------------


def test_a_pickled_result_from_a_local_worker_is_refused_unread(local_site, tmp_path):
    marker = tmp_path / "ran-in-the-service"
    with pytest.raises(ResultNotData, match="not JSON data"):
        local_site.submit(answer_with_a_pickle, str(marker)).result(timeout=120)
    assert not marker.exists()
    assert local_site.submit(echo, {"still": ["serving", 1]}).result(timeout=60) == {"still": ["serving", 1]}
    the_payload_is_real(tmp_path / "control")


# -- (b) a Globus Compute endpoint, through the SDK's own Executor and result handling -------------------


@pytest.fixture(scope="module")
def compute_service(tmp_path_factory):
    service = ComputeService(run_dir=tmp_path_factory.mktemp("byo-endpoint"))
    service.start()
    yield service
    service.stop()


@pytest.fixture
def cloud(compute_service, monkeypatch, tmp_path):
    with answering_the_sdk(compute_service, monkeypatch, tmp_path / "globus"):
        yield compute_service


def test_a_pickled_result_from_a_globus_compute_endpoint_is_refused_unread(cloud, tmp_path):
    from tpm_fed.globus_auth import compute_client

    endpoint_id = cloud.add_endpoint()  # a byo endpoint: its owner decides what its workers send back
    function_id = compute_client().register_function(answer_with_a_pickle)
    site = GlobusComputeSite(SiteConfig(
        name="byo-rogue", access="globus-compute", endpoint_id=endpoint_id,
        functions={"answer_with_a_pickle": RegisteredFunction(function_id=function_id,
                                                              code_version=serving_code_version())},
    ))
    marker = tmp_path / "ran-in-the-service"
    try:
        error = site.submit(answer_with_a_pickle, str(marker)).exception(timeout=120)
    finally:
        site.shutdown()
    assert isinstance(error, ResultNotData) and "not JSON data" in str(error)
    assert not marker.exists()
    assert [s.get("result_serializers") for s in cloud.submissions] == [[JSON_RESULTS]]  # it asked for JSON
    the_payload_is_real(tmp_path / "control")


# -- (c) a pool without the site's certificates cannot join its interchange ---------------------------


def _pool_command(port: int) -> list[str]:
    """The command line of the site's own worker pool, as ``ps`` shows it to any local user."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if any("process_worker_pool" in part for part in argv) and f"--port={port}" in argv:
            return argv
    raise AssertionError(f"no worker pool for port {port} is running")


def _as_rogue(argv: list[str], cert_dir: str, logdir: Path) -> list[str]:
    rogue = []
    skip = False
    for index, part in enumerate(argv):
        if skip:
            skip = False
            continue
        if part == "--cert_dir":
            rogue += [part, cert_dir]
            skip = True
        elif part.startswith("--block_id="):
            rogue.append("--block_id=rogue")
        elif part.startswith("--logdir="):
            rogue.append(f"--logdir={logdir}")
        else:
            rogue.append(part)
    return rogue


@pytest.mark.parametrize("keys", ["none", "its-own"])
def test_a_worker_pool_without_the_sites_certificates_never_registers(local_site, tmp_path, keys):
    assert local_site.submit(echo, 1).result(timeout=120) == 1  # the site's own pool is registered
    executor = local_site._engine.executor
    certificates = Path(executor.cert_dir)  # the site's keys: the owner's alone
    assert certificates.stat().st_mode & 0o777 == 0o700
    assert {path.stat().st_mode & 0o777 for path in certificates.iterdir()} == {0o600}
    cert_dir = "None"
    if keys == "its-own":  # a key pair of its own, and a server key that is not the site's
        from parsl import curvezmq

        cert_dir = curvezmq.create_certificates(tmp_path)
    command = _as_rogue(_pool_command(executor.worker_port), cert_dir, tmp_path / "rogue-logs")
    rogue = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 8  # an accepted pool registers within about a second
        while time.monotonic() < deadline:
            seen = [str(manager["block_id"]) for manager in executor.connected_managers()]
            if "rogue" in seen:
                break
            time.sleep(0.25)
        assert "rogue" not in seen, "a pool without the site's certificates registered with its interchange"
        assert seen, "the site's own pool should still be registered"
        assert local_site.submit(echo, 2).result(timeout=60) == 2
    finally:
        os.killpg(rogue.pid, signal.SIGKILL)
        rogue.wait(timeout=30)
