"""A model split in 2 pipeline stages, served end to end through the in-process runtime: placed on the local
site's 2-"node" block (2 processes on this host), answered as the one-process replica answers, charged for
both nodes; a site that gives 1-node blocks refuses it, saying why, charging nothing.

Oracle: the same model version, unsplit, through the same runtime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tpm_fed.federation import Federation, ModelConfig, Nodes, Price, Prices, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.ledger import Metered, node_ms_used, price_usu
from tpm_fed.protocol.errors import PlacementRefused
from tpm_fed.protocol.requests import GenerationRequest

PROMPTS = ["The cell divides", "A river carries the"]
PRICE = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5, per_node_hour=36.0)


def split_home(root: Path, demo_model_dir: Path, *, nodes_per_block: int) -> TpmHome:
    """The demo model twice: ``whole`` (one process) and ``split`` (2 pipeline stages), one local site."""
    home = TpmHome(root)
    shutil.copytree(demo_model_dir, home.models_dir / "demo")
    site = SiteConfig(name="local", nodes=Nodes(max_nodes_per_block=nodes_per_block, launcher="local-processes"),
                      task_timeout_s=600)
    path = Path("models") / "demo"
    Federation(
        sites=[site],
        models=[ModelConfig(name="whole", path=path, backend="torch"),
                ModelConfig(name="split", path=path, backend="torch", pipeline_parallel_size=2)],
        projects=[ProjectConfig(name="lab", members=[LocalUser().current()], allocations={"local": 1000.0})],
        prices=Prices(generate=PRICE),
    ).dump(home.federation_file)
    return home


def rank_processes() -> dict[int, int]:
    """Running rank processes of split replicas on this host: pid -> parent pid (the serving worker)."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"functions.multinode.rank" in (proc / "cmdline").read_bytes():
                ranks[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # it ended meanwhile
            continue
    return ranks


def expected_charge_usu(result, nodes: int) -> int:
    """The charge by hand from what the result reports: tokens, a cold start per node, every node's time."""
    return price_usu(PRICE, Metered(
        result.usage.prompt_tokens, result.usage.completion_tokens, cold_start=not result.replica.warm, nodes=nodes,
        node_ms=node_ms_used(nodes, result.timings.load_s, result.timings.run_s, result.replica.batch_size)))


def test_a_two_stage_replica_answers_as_one_process_and_both_nodes_are_charged(tmp_path, demo_model_dir):
    from tpm_fed.service.runtime import Runtime

    with Runtime(split_home(tmp_path / "home", demo_model_dir, nodes_per_block=2)) as runtime:
        ask = lambda model: GenerationRequest.create(PROMPTS, model, max_new_tokens=12)  # noqa: E731 - greedy
        quote_whole, quote_split = runtime.quote(ask("whole")), runtime.quote(ask("split"))
        assert (quote_whole.nodes, quote_split.nodes) == (1, 2)
        whole = runtime.submit(ask("whole")).result(600)
        split = runtime.submit(ask("split")).result(600)
        again = runtime.submit(ask("split")).result(600)  # the split replica stays warm
        card = {c["id"]: c["tpm"] for c in runtime.model_cards()}["split"]
        assert (card["sites"], card["nodes"], card["pipeline_parallel_size"]) == ({"local": "hot"}, {"local": 2}, 2)
        # Stage 2 runs in one more process, which the serving worker started (others' tests may run ranks too).
        ranks = [pid for pid, parent in rank_processes().items() if parent == split.replica.pid]
        assert len(ranks) == 1
    assert not set(rank_processes()) & set(ranks)  # no rank outlives the service

    assert split.token_ids == whole.token_ids and again.token_ids == whole.token_ids
    assert split.version == whole.version
    assert "new replica on 2 nodes" in split.placement
    assert not split.replica.warm and again.replica.warm and again.timings.load_s == 0
    for result, nodes in ((whole, 1), (split, 2), (again, 2)):
        assert round(result.charge.charged_su * 1e6) == expected_charge_usu(result, nodes)
    # The quote bounds the charge, and a 2-node quote reserves twice the node time and starts of one node.
    assert split.charge.charged_su <= quote_split.max_su
    node_part = price_usu(PRICE, Metered(cold_start=True, node_ms=600_000))
    assert round((quote_split.max_su - quote_whole.max_su) * 1e6) == node_part


def test_a_site_with_one_node_blocks_refuses_the_split_model_and_charges_nothing(tmp_path, demo_model_dir):
    from tpm_fed.service.runtime import Runtime

    with Runtime(split_home(tmp_path / "home", demo_model_dir, nodes_per_block=1)) as runtime:
        with pytest.raises(PlacementRefused, match="needs 2 nodes of 1 processes .*site local gives blocks of 1 node"):
            runtime.submit(GenerationRequest.create(PROMPTS, "split", max_new_tokens=4)).result(60)
        assert runtime.ledger.statement() == [] and runtime.broker.registry.all() == []
        cards = {c["id"]: c["tpm"] for c in runtime.model_cards()}  # GET /v1/models says where each can run
        assert cards["whole"]["nodes"] == {"local": 1} and "unplaceable" not in cards["whole"]
        assert cards["split"]["nodes"] == {} and cards["split"]["unplaceable"] == {
            "local": "needs 2 nodes of 1 processes (TP 1 x PP 2); site local gives blocks of 1 node"}
