"""A site starts a multi-node replica as one task that asks its engine for all the replica's nodes.

The broker's decision (:func:`tpm_fed.broker.nodes.node_fit`) and the task's request to the engine
(``resource_specification``: ``num_nodes``, ``num_ranks``, ``ranks_per_node``) come from one function;
a Globus Compute site puts that request on the wire, through the real SDK; a ``parsl`` site whose engine
cannot give a task several nodes is refused when the federation is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_globus_compute import RESOURCES, cloud, gc_home, service, tpm  # noqa: F401 - fixtures
from tpm_fed.federation import Federation, ModelConfig, Nodes, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.identity import LocalUser
from tpm_fed.protocol.errors import FederationConfigError, PlacementRefused
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.sites.task_resources import task_resources

CONFIGS = Path(__file__).parent.parent / "endpoint_configs"
ENDPOINT = "00000000-0000-4000-8000-000000000001"


def spec(pp: int = 2, tp: int = 1, accelerators: int = 0) -> dict:
    return ModelSpec(name="m", version="v", path="/m", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                     accelerators=accelerators).to_wire()


def gc_site(**nodes) -> SiteConfig:
    return SiteConfig(name="gc", access="globus-compute", endpoint_id=ENDPOINT, resource_specification={"priority": 1},
                      nodes=Nodes(**nodes))


def test_a_serving_task_of_a_split_model_asks_for_all_its_nodes():
    mpi = gc_site(max_nodes_per_block=4, accelerators_per_node=4, launcher="mpiexec")
    assert task_resources(mpi, [spec(pp=2, tp=4, accelerators=8), []]) == {
        "priority": 1, "num_nodes": 2, "num_ranks": 8, "ranks_per_node": 4}
    assert task_resources(mpi, [spec(pp=1), []]) == {"priority": 1}  # one rank: the site's own request only
    assert task_resources(mpi, ["not a spec"]) == {"priority": 1}
    cpu = gc_site(max_nodes_per_block=2, launcher="srun")
    assert task_resources(cpu, [spec(pp=2)]) == {"priority": 1, "num_nodes": 2, "num_ranks": 2, "ranks_per_node": 1}
    local = SiteConfig(name="local", nodes=Nodes(max_nodes_per_block=2, launcher="local-processes"))
    assert task_resources(local, [spec(pp=2)]) == {}  # the worker starts its ranks itself
    with pytest.raises(PlacementRefused, match="needs 4 nodes of 1 processes .* gives blocks of 2 nodes"):
        task_resources(cpu, [spec(pp=4)])


@pytest.fixture
def no_hpc_interfaces(monkeypatch):
    import parsl.addresses

    monkeypatch.setattr(parsl.addresses, "address_by_interface", lambda ifname: f"10.0.0.1 ({ifname})")


@pytest.mark.parametrize("config, launcher, message", [
    ("workstation.yaml", "mpiexec", "runs GlobusComputeEngine; use type: GlobusMPIEngine"),
    ("multi-node/pbs-polaris-mpi.yaml", "srun", "launches ranks with mpiexec; write nodes.launcher: mpiexec"),
])
def test_a_parsl_site_whose_engine_cannot_start_the_ranks_is_refused(tmp_path, no_hpc_interfaces, config, launcher,
                                                                       message):
    from tpm_fed.sites import build_site

    site = SiteConfig(name="hpc", access="parsl", engine_config=CONFIGS / config,
                      nodes=Nodes(max_nodes_per_block=4, launcher=launcher))
    with pytest.raises(FederationConfigError, match=message):
        build_site(site, tmp_path)
    ok = site.model_copy(update={"engine_config": CONFIGS / "multi-node/pbs-polaris-mpi.yaml",
                                 "nodes": Nodes(max_nodes_per_block=4, launcher="mpiexec")})
    built = build_site(ok, tmp_path)
    built.shutdown()


@pytest.mark.slow
def test_a_globus_compute_site_sends_the_nodes_on_the_wire_and_the_split_replica_answers(cloud, gc_home,  # noqa: F811
                                                                                         monkeypatch):
    from tpm_fed.service.runtime import Runtime

    endpoint_id = cloud.add_endpoint()
    Federation(
        name="gc-multinode",
        sites=[SiteConfig(name="local", cold_start_s=60.0),
               SiteConfig(name="gc", access="globus-compute", endpoint_id=endpoint_id, cold_start_s=1.0,
                          resource_specification=RESOURCES,
                          nodes=Nodes(max_nodes_per_block=2, launcher="mpiexec"))],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch"),
                ModelConfig(name="split", path=Path("models") / DEMO_MODEL_NAME, backend="torch",
                            pipeline_parallel_size=2, sites=["gc"])],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6, "gc": 1e6})],
    ).dump(gc_home.federation_file)
    registered = tpm(gc_home, monkeypatch, "functions", "register", "--site", "gc")
    assert registered.exit_code == 0, registered.output

    prompts = ["The telescope", "A star"]
    with Runtime(gc_home) as runtime:
        split = runtime.generate(prompts, model="split", max_new_tokens=6, project="tests").result(timeout=300)
        whole = runtime.generate(prompts, max_new_tokens=6, project="tests", site="local").result(timeout=300)

    assert split.site == "gc" and split.token_ids == whole.token_ids
    [submission] = cloud.submissions
    # The stand-in's engine runs the task on this host, where the worker starts its second rank itself; a
    # GlobusMPIEngine gives the task these nodes and $PARSL_MPI_PREFIX instead.
    assert submission["resource_specification"] == {**RESOURCES, "num_nodes": 2, "num_ranks": 2, "ranks_per_node": 1}
