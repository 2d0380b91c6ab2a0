"""Every file in endpoint_configs/ is loaded by the endpoint package's own loader."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("name", ["slurm-gpu-vllm.yaml", "pbs-gpu.yaml"])
def test_shared_endpoints_run_only_the_registered_serving_functions(name):
    """A shared endpoint names the functions it runs: a task of any other function is refused by Globus Compute."""
    text = (CONFIGS / name).read_text()
    config = load(text)
    assert len(config.allowed_functions) >= 1
    assert "GLOBUS_COMPUTE_CLIENT_ID" in text  # the comment says which identity starts it: the service's
    from click import ClickException

    with pytest.raises(ClickException, match="UUID"):  # a mistyped id stops the endpoint, not a task
        load(text.replace(config.allowed_functions[0], "not-a-function-id", 1))


def test_a_broken_config_is_rejected_with_the_loaders_message():
    from click import ClickException

    broken = (CONFIGS / "workstation.yaml").read_text().replace("LocalProvider", "LocalProvidr")
    with pytest.raises(ClickException, match="LocalProvidr"):
        load(broken)


MULTI_USER = CONFIGS / "multi-user"


def render(tmp_path, options: str) -> subprocess.CompletedProcess:
    (tmp_path / "options.json").write_text(options)
    return subprocess.run(
        [str(Path(sys.executable).parent / "globus-compute-endpoint"), "render-user-config",
         "-t", str(MULTI_USER / "user_config_template.yaml.j2"),
         "-s", str(MULTI_USER / "user_config_schema.json"), "-o", str(tmp_path / "options.json")],
        capture_output=True, text=True, timeout=120,
    )


def test_a_users_allocation_renders_into_a_valid_endpoint_config(tmp_path):
    done = render(tmp_path, '{"account": "astro42", "partition": "gpu", "walltime": "02:00:00", '
                            '"nodes": 2, "idle_minutes": 45, "environment": "/home/ana/tpm-fed/.venv"}')
    assert done.returncode == 0, done.stderr
    engine = load(done.stdout).engine
    provider = engine.executor.provider
    assert (provider.account, provider.partition, provider.walltime, provider.nodes_per_block) == (
        "astro42", "gpu", "02:00:00", 2)
    assert engine._job_status_kwargs["max_idletime"] == 45 * 60
    assert "/home/ana/tpm-fed/.venv" in provider.worker_init


@pytest.mark.parametrize(
    "options",
    [
        '{"account": "a; rm -rf /", "partition": "gpu", "walltime": "02:00:00", "environment": "/x"}',
        '{"account": "astro42", "partition": "gpu", "walltime": "2h", "environment": "/x"}',
        '{"account": "astro42", "partition": "gpu", "walltime": "02:00:00"}',
        '{"account": "astro42", "partition": "gpu", "walltime": "02:00:00", "environment": "/x", "queue": "q"}',
    ],
    ids=["shell-injection", "walltime", "missing-environment", "unknown-option"],
)
def test_bad_user_options_are_refused_by_the_schema(tmp_path, options):
    done = render(tmp_path, options)
    assert done.returncode != 0


def test_the_multi_user_manager_config_loads(tmp_path):
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    mapping = tmp_path / "identity_mapping.json"  # the site's own file, in production
    mapping.write_text("[]")
    text = (MULTI_USER / "config.yaml").read_text().replace("/etc/globus-compute/identity_mapping.json", str(mapping))
    config = load_config_yaml(text)
    assert type(config).__name__ == "CoreEndpointConfig"  # a manager: no engine of its own
    assert config.display_name == "tpm-fed on your allocation"


def worker_policy_of(worker_init: str, **replace: str):
    """The policy a worker gets from this worker_init: its ``TPM_*`` lines run in a clean bash.

    The other lines (modules, environments) need the cluster; the policy lines
    are run as the shell runs them, then read by the worker's own loader.
    """
    import os

    from functions.policy import load_policy

    lines = [line.strip() for line in worker_init.splitlines()
             if line.strip().startswith(("export TPM_", "unset TPM_"))]
    script = "\n".join(lines)
    for old, new in replace.items():
        script = script.replace(old, new)
    done = subprocess.run(["bash", "-c", script + "\nenv -0"], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True, check=True)
    return load_policy(dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item))


def test_shared_endpoints_refuse_caller_code_and_a_byo_endpoint_runs_it(tmp_path):
    slurm = worker_policy_of(load((CONFIGS / "slurm-gpu-vllm.yaml").read_text()).engine.executor.provider.worker_init)
    assert not slurm.allow_caller_code
    assert str(slurm.adapter_registry) == "/global/cfs/cdirs/m0000/tpm-fed/store/adapters"

    pbs = worker_policy_of(load((CONFIGS / "pbs-gpu.yaml").read_text()).engine.executor.provider.worker_init,
                           **{"/eagle/MyProject/tpm-fed/worker-policy.yaml":
                              str(CONFIGS / "worker-policy" / "rcc-shared.yaml")})
    assert not pbs.allow_caller_code and pbs.max_result_bytes == 4 * 1024 * 1024

    lab = worker_policy_of(load((CONFIGS / "byo-lab.yaml").read_text()).engine.executor.provider.worker_init)
    assert lab.allow_caller_code and str(lab.adapter_registry) == "/srv/tpm-fed/store/adapters"

    workstation = worker_policy_of(load((CONFIGS / "workstation.yaml").read_text()).engine.executor.provider.worker_init)
    assert not workstation.allow_caller_code and workstation.adapter_registry is None

    rendered = render(tmp_path, '{"account": "astro42", "partition": "gpu", "walltime": "02:00:00", '
                                '"environment": "/home/ana/tpm-fed/.venv"}')
    assert rendered.returncode == 0, rendered.stderr
    assert worker_policy_of(load(rendered.stdout).engine.executor.provider.worker_init).allow_caller_code
