"""How the ranks of a split replica are started: the environment contract, MPI inside a multi-node task,
private log files, and a split the model cannot take refused before any rank starts."""

from __future__ import annotations

import stat

import pytest

from functions.backends.pipeline_backend import PipelineBackend
from functions.multinode.launcher import LocalLauncher, MpiLauncher, launcher_here, rank_from_environment
from tpm_fed.protocol.errors import BackendUnavailable, InvalidRequest
from tpm_fed.protocol.model import ModelSpec


def _spec(path, **split) -> ModelSpec:
    return ModelSpec(name="demo-llama", version="0" * 16, path=str(path), **split)


def test_each_rank_gets_the_torch_distributed_environment_and_the_spec_as_data(tmp_path):
    spec = _spec(tmp_path, pipeline_parallel_size=2)
    env = LocalLauncher().environment(spec, 1, 2)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0 and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert ModelSpec.model_validate_json(env["TPM_STAGE_SPEC"]) == spec


def test_inside_a_multi_node_task_the_ranks_start_through_the_mpi_prefix(monkeypatch):
    monkeypatch.setenv("PARSL_MPI_PREFIX", "mpiexec -n 3 -ppn 1 -hosts n2,n3,n4")
    launcher = launcher_here()
    assert isinstance(launcher, MpiLauncher)
    assert launcher.command()[:7] == ["mpiexec", "-n", "3", "-ppn", "1", "-hosts", "n2,n3,n4"]
    assert launcher.command()[-2:] == ["-m", "functions.multinode.rank"]
    monkeypatch.delenv("PARSL_MPI_PREFIX")
    assert type(launcher_here()) is LocalLauncher


def test_a_rank_reads_its_number_from_rank_or_from_the_mpi_launcher_past_rank_0():
    assert rank_from_environment({"RANK": "2", "PMI_RANK": "0"}) == 2
    assert rank_from_environment({"RANK": "-1", "PMI_RANK": "0", "TPM_RANK_OFFSET": "1"}) == 1
    assert rank_from_environment({"OMPI_COMM_WORLD_RANK": "2", "TPM_RANK_OFFSET": "1"}) == 3
    with pytest.raises(RuntimeError):
        rank_from_environment({})


def test_the_ranks_logs_are_the_workers_alone():
    launcher = LocalLauncher()
    assert stat.S_IMODE(launcher._logs.stat().st_mode) == 0o700


def test_a_split_the_model_cannot_take_is_refused_before_any_rank_starts(demo_model_dir):
    launcher = LocalLauncher()
    with pytest.raises(InvalidRequest, match="5 pipeline stages cannot split 4 layers"):
        PipelineBackend.load(_spec(demo_model_dir, pipeline_parallel_size=5), launcher=launcher)
    with pytest.raises(BackendUnavailable, match="tensor_parallel_size 2 needs the vLLM backend"):
        PipelineBackend.load(_spec(demo_model_dir, pipeline_parallel_size=2, tensor_parallel_size=2),
                             launcher=launcher)
    assert launcher.processes == []
