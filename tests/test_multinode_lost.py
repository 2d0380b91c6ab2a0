"""A split replica is started, reused warm and lost as one: a dead rank fails it whole, typed, and
leaves no rank of it running; the worker then loads a fresh replica for the requests run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from functions.backends import SPLIT_ON_TORCH
from functions.replica_cache import REPLICAS
from functions.serve import serve_batch
from tpm_fed.protocol.errors import ReplicaLost, SiteError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.versions import hash_model_dir
from tpm_fed.sites.remote_errors import error_from_traceback


def _spec(model_dir, stages: int) -> ModelSpec:
    return ModelSpec(name="demo-llama", version=hash_model_dir(model_dir), path=str(model_dir),
                     pipeline_parallel_size=stages)


def _request(max_new_tokens: int) -> dict:
    return GenerationRequest.create(["The cell divides"], "demo-llama", max_new_tokens=max_new_tokens,
                                    min_new_tokens=max_new_tokens).to_wire()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose only once reaped; the launcher reaps its children.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _backend(spec):
    return REPLICAS._replicas[spec.key].backend


def test_a_split_replica_is_one_warm_replica_and_a_killed_rank_fails_it_whole(demo_model_dir):
    spec = _spec(demo_model_dir, 3)  # ranks 1 and 2: killing 1 leaves 2, which must not outlive the replica
    try:
        cold = serve_batch(spec.to_wire(), [_request(4)])
        warm = serve_batch(spec.to_wire(), [_request(4)])
        assert "result" in cold["outcomes"][0] and cold["replica"]["warm"] is False and SPLIT_ON_TORCH in cold["notes"]
        assert warm["replica"]["warm"] is True and warm["load_s"] == 0.0
        assert warm["outcomes"][0]["result"]["completions"] == cold["outcomes"][0]["result"]["completions"]
        backend = _backend(spec)
        ranks = backend.launcher.pids()
        assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)

        failure: dict = {}

        def long_request():
            try:
                failure["reply"] = serve_batch(spec.to_wire(), [_request(200), _request(200)])
            except BaseException as error:  # noqa: BLE001 - what the task raises is the test's subject
                failure["error"] = error

        task = threading.Thread(target=long_request)
        task.start()
        deadline = time.monotonic() + 120
        while backend.pipeline.exchanges < 20 and time.monotonic() < deadline:  # mid-request
            time.sleep(0.01)
        os.kill(ranks[0], signal.SIGKILL)
        task.join(120)
        assert not task.is_alive()
        assert isinstance(failure.get("error"), ReplicaLost), failure
        assert _gone_within(ranks, 10), "a rank of the lost replica is still running"
        assert spec not in REPLICAS.loaded()

        again = serve_batch(spec.to_wire(), [_request(4)])  # the request run again: a fresh replica
        assert again["replica"]["warm"] is False
        assert again["outcomes"][0]["result"]["completions"] == cold["outcomes"][0]["result"]["completions"]
        assert not set(_backend(spec).launcher.pids()) & set(ranks)
    finally:
        REPLICAS.evict(spec)


def test_a_replica_evicted_or_closed_leaves_no_rank_running(demo_model_dir):
    spec = _spec(demo_model_dir, 2)
    serve_batch(spec.to_wire(), [_request(2)])
    ranks = _backend(spec).launcher.pids()
    REPLICAS.evict(spec)
    assert _gone_within(ranks, 10)


def test_the_ranks_die_with_the_worker_that_started_them(demo_model_dir, tmp_path):
    """The worker process killed outright (no cleanup runs): the kernel ends its ranks."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\n"
        "from functions.backends.pipeline_backend import PipelineBackend\n"
        "from tpm_fed.protocol.model import ModelSpec\n"
        "backend = PipelineBackend.load(ModelSpec.model_validate_json(sys.argv[1]))\n"
        "print(*backend.launcher.pids(), flush=True)\n"
        "sys.stdin.read()\n")
    worker = subprocess.Popen([sys.executable, str(script), _spec(demo_model_dir, 2).model_dump_json()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        ranks = [int(pid) for pid in worker.stdout.readline().split()]
        assert ranks and all(_alive(pid) for pid in ranks)
        worker.kill()
        worker.wait()
        assert _gone_within(ranks, 10)
    finally:
        worker.kill()


def test_a_lost_replica_is_a_lost_worker_to_the_service_so_its_task_is_run_again():
    traceback_text = ("Traceback (most recent call last):\n  File \"functions/serve.py\", line 80\n"
                      "tpm_fed.protocol.errors.ReplicaLost: rank 1 of this replica is gone (Connection closed by peer)")
    error = error_from_traceback("local", traceback_text)
    assert type(error) is SiteError and "lost" in str(error)
    assert issubclass(ReplicaLost, SiteError)
