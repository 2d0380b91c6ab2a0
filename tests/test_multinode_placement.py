"""Replicas larger than one node: how many nodes a model needs, which sites can give them, and the price."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpm_fed.broker import Broker, PlacementRequest, ReplicaRegistry, SiteHealth
from tpm_fed.broker.nodes import node_fit, nodes_needed
from tpm_fed.federation import Federation
from tpm_fed.ledger import Ledger, Metered, node_ms_used, price_usu
from tpm_fed.protocol.errors import FederationConfigError, PlacementRefused
from tpm_fed.state import open_database

SU = 1_000_000


def federation(sites: list[dict], models: list[dict], prices: dict | None = None) -> Federation:
    raw = {
        "sites": sites,
        "models": models,
        "projects": [{"name": "astro", "members": ["ana"], "allocations": {s["name"]: 10_000 for s in sites}}],
    }
    if prices is not None:
        raw["prices"] = prices
    return Federation.model_validate(raw)


def gpu_site(name: str, nodes_per_block: int, gpus: int = 4, **extra) -> dict:
    nodes = {"max_nodes_per_block": nodes_per_block, "accelerators_per_node": gpus}
    if nodes_per_block > 1:
        nodes["launcher"] = "mpiexec"
    return {"name": name, "access": "globus-compute", "endpoint_id": "00000000-0000-4000-8000-000000000001",
            "nodes": nodes, "cold_start_s": 60, **extra}


def gpu_model(name: str, tp: int, pp: int) -> dict:
    return {"name": name, "path": f"/models/{name}", "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
            "accelerators": tp * pp}


def broker_for(fed: Federation, tmp_path) -> Broker:
    engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
    return Broker(fed, Ledger(engine), ReplicaRegistry(engine), SiteHealth())


def ask(model: str, site: str | None = None, kind: str = "generate", estimate: int = SU // 100,
        cold: int = SU // 2) -> PlacementRequest:
    return PlacementRequest(identity="ana", project="astro", model=model, version="v1", kind=kind,
                            location="local", estimate_usu=estimate, cold_start_usu=cold, site=site)


# -- nodes needed ------------------------------------------------------------------------------------------

@given(tp=st.integers(1, 16), pp=st.integers(1, 16), per_node=st.integers(1, 16))
def test_the_nodes_hold_every_rank_and_keep_each_tensor_parallel_group_on_one_node(tp, pp, per_node):
    nodes = nodes_needed(tp, pp, per_node)
    assert nodes * per_node >= tp * pp  # room for every rank
    if tp <= per_node:  # whole stages to a node: no tensor-parallel group is cut by a node boundary
        assert nodes == math.ceil(pp / (per_node // tp))
    if per_node % tp == 0:
        assert nodes == math.ceil(tp * pp / per_node)  # the plain count where the groups pack exactly
    if tp == per_node:
        assert nodes == pp  # vLLM's advice: TP = GPUs per node, PP = nodes


def test_sizes_as_the_anchors_run_them():
    assert nodes_needed(8, 4, 8) == 4  # Argonne's 405B: TP 8 x PP 4 on 4 nodes of 8
    assert nodes_needed(4, 2, 4) == 2
    assert nodes_needed(8, 1, 4) == 2  # a TP group larger than a node takes two
    assert nodes_needed(3, 4, 4) == 4  # 12 ranks would fit 3 nodes of 4, but only by cutting TP groups


def test_a_cpu_model_counts_processes_per_node():
    fed = federation([{"name": "local", "nodes": {"max_nodes_per_block": 2, "launcher": "local-processes"}}],
                     [{"name": "demo", "path": "/m", "pipeline_parallel_size": 2}])
    fit = node_fit(fed.models[0], fed.sites[0])
    assert (fit.nodes, fit.ranks_per_node, fit.unit, fit.refusal) == (2, 1, "processes", None)
    two_per_node = fed.sites[0].model_copy(update={"nodes": fed.sites[0].nodes.model_copy(
        update={"processes_per_node": 2})})
    assert node_fit(fed.models[0], two_per_node).nodes == 1


# -- the federation file says it, checked once ---------------------------------------------------------------

@pytest.mark.parametrize("site, model, message", [
    ({"name": "big", "nodes": {"max_nodes_per_block": 2}}, None, "nodes.launcher must say how"),
    ({"name": "here", "nodes": {"max_nodes_per_block": 2, "launcher": "mpiexec"}}, None,
     "a local site's nodes are processes on this host"),
    ({"name": "s", "access": "parsl", "engine_config": "e.yaml", "nodes": {"launcher": "qsub"}}, None,
     "launcher"),
    ({"name": "s", "capacity": {"accelerators_per_slot": 8}, "nodes": {"accelerators_per_node": 4}}, None,
     "disagree"),
    ({"name": "s"}, {"name": "m", "path": "/m", "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
                     "accelerators": 4}, "makes 8 ranks of one accelerator each: write 8"),
    ({"name": "s"}, {"name": "m", "path": "/m", "pipeline_parallel_size": 0}, "pipeline_parallel_size"),
])
def test_a_federation_that_cannot_start_its_replicas_is_refused_naming_the_field(tmp_path, site, model, message):
    import yaml

    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({"sites": [site], "models": [model] if model else []}))
    with pytest.raises(FederationConfigError, match=message):
        Federation.load(path)


# -- placement ---------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(st.integers(1, 8), min_size=1, max_size=5), gpus=st.lists(st.sampled_from([0, 4, 8]),
       min_size=5, max_size=5), tp=st.sampled_from([1, 2, 4, 8]), pp=st.integers(1, 6))
def test_a_replica_is_placed_only_where_a_block_holds_all_its_nodes(tmp_path_factory, blocks, gpus, tp, pp):
    sites = [gpu_site(f"s{i}", block, gpus=gpus[i]) for i, block in enumerate(blocks)]
    fed = federation(sites, [gpu_model("big", tp, pp)])
    broker = broker_for(fed, tmp_path_factory.mktemp("db"))
    fitting = {s["name"] for s in sites
               if s["nodes"]["accelerators_per_node"] and
               nodes_needed(tp, pp, s["nodes"]["accelerators_per_node"]) <= s["nodes"]["max_nodes_per_block"]}
    decision = broker.decide(ask("big"))
    if not fitting:
        assert decision.chosen is None and "cannot be hosted" in decision.refusal
        with pytest.raises(PlacementRefused, match="needs"):
            broker.admit("r1", ask("big"))
        return
    chosen = fed.site(decision.chosen.site)
    assert chosen.name in fitting
    nodes = nodes_needed(tp, pp, chosen.accelerators_per_node)
    assert decision.chosen.nodes == nodes <= chosen.nodes.max_nodes_per_block
    assert {c.site for c in decision.candidates if c.excluded} == {s["name"] for s in sites} - fitting


def test_explain_says_why_a_site_too_small_is_refused(tmp_path):
    fed = federation([gpu_site("small", 1), gpu_site("big", 2)], [gpu_model("m", 4, 2)])
    broker = broker_for(fed, tmp_path)
    decision = broker.decide(ask("m"))
    assert decision.chosen.site == "big" and decision.chosen.nodes == 2
    text = decision.explain()
    assert "small: new replica on 2 nodes: out: needs 2 nodes of 4 GPUs (TP 4 x PP 2); " \
           "site small gives blocks of 1 node" in text
    assert "big: new replica on 2 nodes:" in text

    named = broker.decide(ask("m", site="small"))
    assert named.chosen is None
    assert named.refusal == ("model 'm' cannot be hosted on site 'small': needs 2 nodes of 4 GPUs (TP 4 x PP 2); "
                             "site small gives blocks of 1 node")


def test_a_gpu_model_is_not_placed_on_a_cpu_site_and_explain_says_so(tmp_path):
    fed = federation([{"name": "cpu"}], [gpu_model("m", 1, 1)])
    with pytest.raises(PlacementRefused, match="needs 1 accelerators .* site cpu has no accelerators"):
        broker_for(fed, tmp_path).admit("r1", ask("m"))


def test_a_start_over_more_nodes_is_expected_to_take_longer(tmp_path):
    site = gpu_site("big", 4)
    site["nodes"]["cold_start_s_per_extra_node"] = 15
    fed = federation([site], [gpu_model("one", 4, 1), gpu_model("four", 4, 4)])
    broker = broker_for(fed, tmp_path)
    assert broker.decide(ask("one")).chosen.cold_s == 60
    assert broker.decide(ask("four")).chosen.cold_s == 60 + 3 * 15


# -- price: every node is charged ----------------------------------------------------------------------------

NODE_TIME_ONLY = {"generate": {"per_node_hour": 3.6}}  # 1 milli-SU per node-second, nothing else


@pytest.mark.parametrize("prices, cold", [(NODE_TIME_ONLY, 0), ({"generate": {"per_cold_start": 0.5}}, SU // 2)],
                         ids=["node-time", "cold-start"])
def test_the_quote_for_a_two_node_replica_is_twice_one_nodes(tmp_path, prices, cold):
    fed = federation([gpu_site("big", 2, task_timeout_s=900)], [gpu_model("one", 4, 1), gpu_model("two", 4, 2)],
                     prices)
    broker = broker_for(fed, tmp_path)
    one = broker.quote(ask("one", estimate=0, cold=cold))
    two = broker.quote(ask("two", estimate=0, cold=cold))
    assert (one.nodes, two.nodes) == (1, 2)
    assert one.max_su > 0 and two.max_su == 2 * one.max_su
    assert two.expected_su == 2 * one.expected_su
    if prices is NODE_TIME_ONLY:  # the bound: every node for the whole task timeout
        assert one.max_su == pytest.approx(3.6 * 900 / 3600)


def test_a_project_whose_balance_covers_one_node_but_not_two_is_refused_the_two_node_replica(tmp_path):
    sites = [gpu_site("big", 2, task_timeout_s=3600)]
    fed = federation(sites, [gpu_model("one", 4, 1), gpu_model("two", 4, 2)], {"generate": {"per_node_hour": 1.0}})
    fed = fed.model_copy(update={"projects": [fed.projects[0].model_copy(update={"allocations": {"big": 1.5}})]})
    broker = broker_for(fed, tmp_path)
    assert broker.decide(ask("one", estimate=0, cold=0)).chosen is not None
    refused = broker.decide(ask("two", estimate=0, cold=0))
    assert refused.chosen is None and "balance 1.500000 SU < estimate 2.000000 SU" in refused.explain()


def test_settled_node_time_counts_every_node_and_a_cold_start_per_node():
    price = Federation.model_validate({"sites": [{"name": "s"}], "prices": {"generate": {
        "per_node_hour": 3.6, "per_cold_start": 0.5}}}).prices.generate
    one = price_usu(price, Metered(cold_start=True, nodes=1, node_ms=node_ms_used(1, 2.0, 8.0, batch_size=2)))
    two = price_usu(price, Metered(cold_start=True, nodes=2, node_ms=node_ms_used(2, 2.0, 8.0, batch_size=2)))
    assert one == SU // 2 + 5_000 * 1000 // 1000  # half of 10 s at 1 milli-SU per node-second, plus one start
    assert two == 2 * one


# -- the command line says it ------------------------------------------------------------------------------

def test_tpm_submit_explain_says_why_a_site_was_refused_and_the_quote_names_both_nodes(tmp_path, demo_model_dir,
                                                                                       monkeypatch):
    import shutil
    from pathlib import Path

    from tests.service_helpers import tpm_in_process
    from tpm_fed.federation import ModelConfig, Nodes, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / "demo")
    Federation(
        sites=[SiteConfig(name="small"),
               SiteConfig(name="big", nodes=Nodes(max_nodes_per_block=2, launcher="local-processes"))],
        models=[ModelConfig(name="split", path=Path("models") / "demo", backend="torch", pipeline_parallel_size=2)],
        projects=[ProjectConfig(name="lab", members=[LocalUser().current()], allocations={"small": 10, "big": 10})],
    ).dump(home.federation_file)

    quoted = tpm_in_process(home.root, monkeypatch, "submit", "The cell", "--model", "split", "--quote", "--explain")
    assert quoted.exit_code == 0, quoted.output
    assert "on big, a new replica (cold start) on 2 nodes, all charged" in quoted.output
    assert ("small: new replica on 2 nodes: out: needs 2 nodes of 1 processes (TP 1 x PP 2); "
            "site small gives blocks of 1 node") in quoted.output

    listed = tpm_in_process(home.root, monkeypatch, "models")
    [row] = [line for line in listed.output.splitlines() if line.startswith("split ")]
    assert row.endswith("big:2 (too small: small)")

    refused = tpm_in_process(home.root, monkeypatch, "submit", "The cell", "--model", "split", "--site", "small",
                             "--explain")
    assert refused.exit_code != 0
    assert ("cannot be hosted on site 'small': needs 2 nodes of 1 processes (TP 1 x PP 2); "
            "site small gives blocks of 1 node") in refused.output


def test_the_placement_benchmark_places_every_request_in_both_federations():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "bench_multinode_placement.py"
    done = subprocess.run([sys.executable, str(script), "--sites", "40", "--replicas", "300", "--placements", "200",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # it exits non-zero if any request was refused
    assert "ratio multi-node / one node:" in done.stdout


def test_a_batch_of_two_node_lines_counts_each_start_on_both_nodes_once():
    """Lines of one batch share a site's starts: each line's bound drops its own start (on every node) and the
    site's possible starts (its replica slots) are added once, each on every node."""
    from types import SimpleNamespace

    from tpm_fed.batches.quoting import _bound_per_site
    from tpm_fed.protocol.quotes import Quote

    fed = federation([gpu_site("big", 2)], [gpu_model("two", 4, 2)], {"generate": {"per_cold_start": 0.5}})
    line = dict(project="astro", model="two", version="v1", kind="generate", site="big", replica=None, nodes=2,
                cold=True, free=False, expected_su=1.0 + 2 * 0.5, max_su=1.0 + 2 * 0.5, estimated_s=60.0,
                explanation="")
    bound = _bound_per_site(SimpleNamespace(federation=fed), [Quote(**line), Quote(**line)])
    assert bound == {"big": pytest.approx(2 * 1.0 + 1 * 2 * 0.5)}  # two lines' work, one start of 2 nodes
