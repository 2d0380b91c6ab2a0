"""Multi-node endpoint configs (endpoint_configs/multi-node/) load with the endpoint's own loader and agree
with what the federation tells the broker about those sites; the broker's per-task request is what the MPI
engine accepts, and Parsl's own composer turns it into a launch line over all the replica's nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tpm_fed.broker.nodes import mpi_resource_specification, node_fit
from tpm_fed.federation import Federation

FOLDER = Path(__file__).parent.parent / "endpoint_configs" / "multi-node"
ENDPOINT_OF_SITE = {"polaris-multinode": "pbs-polaris-mpi.yaml", "slurm-h100-multinode": "slurm-mpi-8gpu.yaml"}


@pytest.fixture(autouse=True)
def no_hpc_interfaces(monkeypatch):
    """HPC configs name network interfaces (hsn0, bond0) this machine lacks."""
    import parsl.addresses

    monkeypatch.setattr(parsl.addresses, "address_by_interface", lambda ifname: f"10.0.0.1 ({ifname})")


def load_engine(name: str):
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    return load_config_yaml((FOLDER / name).read_text()).engine


def gpus_per_node(provider) -> int:
    """GPUs per node as the batch scheduler is asked for them (PBS select, Slurm --gpus-per-node)."""
    text = f"{getattr(provider, 'select_options', '')} {provider.scheduler_options}"
    return int(re.search(r"(?:ngpus=|--gpus-per-node=)(\d+)", text).group(1))


@pytest.mark.parametrize("site_name", sorted(ENDPOINT_OF_SITE))
def test_the_endpoint_and_the_federation_agree_on_nodes_gpus_and_launcher(site_name):
    federation = Federation.load(FOLDER / "federation-sites.yaml")
    site = federation.site(site_name)
    engine = load_engine(ENDPOINT_OF_SITE[site_name])
    try:
        executor = engine.executor
        assert type(engine).__name__ == "GlobusMPIEngine" and type(executor).__name__ == "MPIExecutor"
        assert executor.max_workers_per_block == 1  # one replica per block: its ranks own every GPU
        assert type(executor.provider.launcher).__name__ == "SimpleLauncher"
        assert executor.provider.nodes_per_block == site.nodes.max_nodes_per_block
        assert executor.mpi_launcher == site.nodes.launcher
        assert gpus_per_node(executor.provider) == site.accelerators_per_node
        assert executor.provider.max_blocks == site.capacity.max_replicas
    finally:
        engine.shutdown()


@pytest.mark.parametrize("site_name", sorted(ENDPOINT_OF_SITE))
def test_each_model_that_fits_gets_a_launch_line_over_all_its_nodes(site_name):
    from parsl.executors.high_throughput.mpi_prefix_composer import compose_all

    federation = Federation.load(FOLDER / "federation-sites.yaml")
    site = federation.site(site_name)
    engine = load_engine(ENDPOINT_OF_SITE[site_name])
    try:
        placed = 0
        for model in federation.models:
            fit = node_fit(model, site)
            if fit.refusal:
                continue
            spec = mpi_resource_specification(model, fit)
            engine.executor.validate_resource_spec(spec)  # the engine's own check: a bad key raises
            hosts = [f"node{i}" for i in range(fit.nodes)]
            prefix = compose_all(site.nodes.launcher, {k: str(v) for k, v in spec.items()}, hosts)["PARSL_MPI_PREFIX"]
            assert ",".join(hosts) in prefix and str(model.world_size) in prefix.split()
            placed += 1
        assert placed >= 1
    finally:
        engine.shutdown()


def test_the_example_models_need_more_than_one_node_and_a_small_block_refuses_them():
    federation = Federation.load(FOLDER / "federation-sites.yaml")
    fits = {(m.name, s.name): node_fit(m, s) for m in federation.models for s in federation.sites}
    assert fits[("llama-70b", "polaris-multinode")].nodes == 2
    assert fits[("llama-405b", "slurm-h100-multinode")].nodes == 2
    assert fits[("llama-405b", "polaris-multinode")].nodes == 4
    assert all(f.refusal is None for f in fits.values())
    one_node = federation.site("polaris-multinode").model_copy(update={"nodes": federation.site(
        "polaris-multinode").nodes.model_copy(update={"max_nodes_per_block": 1})})
    assert "gives blocks of 1 node" in node_fit(federation.model("llama-70b"), one_node).refusal
