"""Every file in endpoint_configs/ is loaded by the endpoint package's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent.parent / "endpoint_configs"


@pytest.fixture(autouse=True)
def no_hpc_interfaces(monkeypatch):
    """HPC configs name network interfaces (hsn0, bond0) this machine lacks."""
    import parsl.addresses

    monkeypatch.setattr(parsl.addresses, "address_by_interface", lambda ifname: f"10.0.0.1 ({ifname})")


def load(text: str):
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    config = load_config_yaml(text)
    config.engine.shutdown()  # building the engine starts nothing, but tidy up
    return config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads_with_the_endpoint_loader(path):
    config = load(path.read_text())
    engine = config.engine
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert engine.executor.provider is not None


def test_gpu_configs_keep_replicas_warm_and_pin_gpus():
    slurm = load((CONFIGS / "slurm-gpu-vllm.yaml").read_text()).engine
    assert slurm.executor.max_workers_per_node == 1  # one tensor-parallel replica per node
    assert slurm.executor.provider.launcher.__class__.__name__ == "SrunLauncher"
    assert slurm._job_status_kwargs["max_idletime"] == 1800

    pbs = load((CONFIGS / "pbs-gpu.yaml").read_text()).engine
    assert pbs.executor.available_accelerators == ["0", "1", "2", "3"]
    assert pbs.executor.provider.launcher.__class__.__name__ == "MpiExecLauncher"


def test_a_broken_config_is_rejected_with_the_loaders_message():
    from click import ClickException

    broken = (CONFIGS / "workstation.yaml").read_text().replace("LocalProvider", "LocalProvidr")
    with pytest.raises(ClickException, match="LocalProvidr"):
        load(broken)
