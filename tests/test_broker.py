"""Placement over synthetic federations: locality, allocation, load, capacity, byo, health."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tpm_fed.broker import Broker, PlacementRequest, ReplicaRegistry, SiteHealth
from tpm_fed.protocol.errors import InsufficientBalance, NotPermitted, PlacementRefused
from tpm_fed.federation import Federation
from tpm_fed.ledger import Ledger
from tpm_fed.state import open_database

SU = 1_000_000


def federation(**overrides) -> Federation:
    raw = {
        "sites": [
            {"name": "near", "location": "chicago", "capacity": {"max_replicas": 2}, "cold_start_s": 20},
            {"name": "far", "location": "berkeley", "capacity": {"max_replicas": 2}, "cold_start_s": 20},
            {"name": "lab", "billing": "byo", "owner": "astro", "location": "chicago", "cold_start_s": 20},
        ],
        "models": [{"name": "llm", "path": "/models/llm"}, {"name": "other", "path": "/models/other"}],
        "projects": [
            {"name": "astro", "members": ["ana"], "allocations": {"near": 100, "far": 100}},
            {"name": "bio", "members": ["bo"], "allocations": {"far": 100}},
            {"name": "poor", "members": ["pat"], "allocations": {"near": 0.000001}},
        ],
        "latency_ms": {"chicago": {"berkeley": 50}},
        "default_location": "chicago",
    }
    raw.update(overrides)
    return Federation.model_validate(raw)


@pytest.fixture
def broker(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
    return Broker(federation(), Ledger(engine), ReplicaRegistry(engine), SiteHealth(probe_after_s=60))


def ask(project="bio", location="chicago", model="llm", site=None, estimate=SU // 100, identity="bo"):
    return PlacementRequest(identity=identity, project=project, model=model, version="v1", kind="generate",
                            location=location, estimate_usu=estimate, cold_start_usu=SU // 2, site=site,
                            backend="torch")


def admit(broker, request, rid=None):
    return broker.admit(rid or f"r{time.perf_counter_ns()}", request)


def test_locality_prefers_the_near_site_when_all_else_is_equal(broker):
    decision = broker.decide(ask(project="astro", identity="ana", location="berkeley"))
    assert decision.chosen.site == "far"
    decision = broker.decide(ask(project="astro", identity="ana", location="chicago"))
    assert decision.chosen.site in {"near", "lab"}


def test_allocation_decides_where_a_project_may_run(broker):
    decision = broker.decide(ask(project="bio", location="chicago"))
    assert decision.chosen.site == "far"  # bio holds SUs only at the far site
    reasons = {c.site: c.excluded for c in decision.candidates if c.excluded}
    assert reasons == {"2 other site(s)": "project 'bio' has no allocation there (or they are byo sites of others)"}
    named = broker.decide(ask(project="bio", site="near"))  # asked for by name: the precise reason
    assert named.chosen is None and named.candidates[0].excluded == "project 'bio' has no allocation here"
    nowhere = broker.decide(ask(project="bio", model="llm", site=None, estimate=10**12))
    assert nowhere.chosen is None and "lacks the SUs" in nowhere.refusal


def test_byo_site_is_free_for_its_project_and_closed_to_others(broker):
    admission = admit(broker, ask(project="astro", identity="ana", location="chicago"))
    assert admission.site == "lab" and admission.free and admission.estimate_usu == 0  # tie on time: free wins
    with pytest.raises(NotPermitted, match="project 'astro'"):
        broker.decide(ask(project="bio", site="lab"))


def test_warm_replica_beats_a_cold_start_and_load_spreads_when_queues_grow(broker):
    first = admit(broker, ask())
    assert first.cold and first.site == "far"
    broker.registry.served(first.replica_id, 1, 0.5, None)
    second = admit(broker, ask())
    assert not second.cold and second.replica_id == first.replica_id
    broker.registry.queued(first.replica_id, 100)  # a long queue: ~100 x 0.5 s
    spread = admit(broker, ask())
    assert spread.cold and spread.site == "far"  # a second replica beats waiting
    assert spread.replica_id == first.replica_id[:-1] + "1"


def test_at_capacity_an_idle_replica_gives_way_and_busy_ones_do_not(broker):
    a = admit(broker, ask(model="llm"))
    b = admit(broker, ask(model="other"))
    assert {a.site, b.site} == {"far"}
    broker.registry.served(a.replica_id, 1, 0.1, None)  # a is idle now, b still has its request
    third = broker.decide(ask(model="llm", project="bio")).chosen
    assert third.replica_id == a.replica_id  # warm replica of the same model first
    c = broker.decide(PlacementRequest("bo", "bio", "third-model", "v1", "generate", "chicago", 1, 0))
    assert c.chosen is None  # not hosted: refused with the reason
    assert "cannot be hosted" in c.refusal


def test_a_batch_finishing_after_its_replica_was_stopped_does_not_revive_it(broker):
    admission = admit(broker, ask())
    broker.registry.set_state([admission.replica_id], "stopped")
    broker.registry.served(admission.replica_id, 1, 0.1, None)
    assert broker.registry.get(admission.replica_id).state == "stopped"
    assert broker.registry.live_per_site().get("far", 0) == 0


def test_a_model_is_placed_only_for_the_kinds_it_serves(broker):
    refused = broker.decide(PlacementRequest("bo", "bio", "llm", "v1", "trace", "chicago", 1, 0))
    assert refused.chosen is None
    assert refused.refusal == "model 'llm' does not serve 'trace' requests (it serves: generate)"


def test_full_and_busy_site_refuses_with_reasons(broker):
    for model in ("llm", "other"):
        admit(broker, ask(model=model))  # both slots busy at far
    with pytest.raises(PlacementRefused) as refused:
        admit(broker, PlacementRequest("bo", "bio", "llm", "v2", "generate", "chicago", SU // 100, 0))
    assert "at capacity (2 replicas, all busy)" in refused.value.explanation


def test_insufficient_balance_refuses_and_charges_nothing(broker):
    with pytest.raises(InsufficientBalance, match="lacks the SUs"):
        admit(broker, ask(project="poor", identity="pat", estimate=SU))
    assert [c for c in broker.ledger.statement() if c.project == "poor"] == []


def test_reservation_race_falls_through_to_the_next_candidate(broker):
    decision = broker.decide(ask(project="astro", identity="ana", location="berkeley"))
    assert decision.chosen.site == "far"
    broker.ledger.reserve("someone-else", project="astro", site="far", identity="ana", model="llm",
                          version="v1", kind="generate", estimate_usu=100 * SU)  # spent meanwhile
    admission = admit(broker, ask(project="astro", identity="ana", location="berkeley"))
    assert admission.site in {"near", "lab"}


def test_every_allocation_exhausted_raises_insufficient_balance(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
    fed = federation(projects=[{"name": "astro"}, {"name": "bio", "members": ["bo"], "allocations": {"far": 1}}])
    broker = Broker(fed, Ledger(engine), ReplicaRegistry(engine))
    broker.ledger.reserve("x", project="bio", site="far", identity="bo", model="llm", version="v1",
                          kind="generate", estimate_usu=SU - 10)
    with pytest.raises(InsufficientBalance, match="lacks the SUs"):
        admit(broker, ask(estimate=SU // 100))


def test_unhealthy_site_is_avoided_then_probed_back(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
    health = SiteHealth(probe_after_s=0.2)
    broker = Broker(federation(), Ledger(engine), ReplicaRegistry(engine), health)
    health.failed("lab")
    decision = broker.decide(ask(project="astro", identity="ana"))
    assert decision.chosen.site == "near"
    assert any(c.site == "lab" and "unhealthy" in c.excluded for c in decision.candidates if c.excluded)
    time.sleep(0.25)
    assert broker.decide(ask(project="astro", identity="ana")).chosen.site == "lab"


def test_replica_state_survives_a_broker_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'tpm.db'}"
    engine = open_database(url)
    broker = Broker(federation(), Ledger(engine), ReplicaRegistry(engine))
    admission = admit(broker, ask())
    broker.registry.served(admission.replica_id, 1, 0.7, "worker-1")
    again = Broker(federation(), Ledger(open_database(url)), ReplicaRegistry(open_database(url)))
    restored = again.registry.get(admission.replica_id)
    assert (restored.state, round(restored.service_s, 3)) == ("warm", round(0.7 * 0.3 + 0.7, 3))
    assert not admit(again, ask()).cold


def test_replicas_of_a_dead_process_are_stopped_on_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'tpm.db'}"
    dead = f"{socket.gethostname()}:999999999"
    broker = Broker(federation(), Ledger(open_database(url)), ReplicaRegistry(open_database(url), holder=dead))
    admission = admit(broker, ask())
    again = ReplicaRegistry(open_database(url))
    assert again.get(admission.replica_id) is None
    assert [r.state for r in again.recorded()] == ["stopped"]


def test_idle_replicas_stop_after_keep_alive(broker):
    admission = admit(broker, ask())
    broker.registry.served(admission.replica_id, 1, 0.1, None)
    assert broker.reap_idle(now=time.time() + 10) == []
    assert broker.reap_idle(now=time.time() + 601) == [admission.replica_id]
    assert broker.registry.get(admission.replica_id).state == "stopped"


def test_a_replica_on_another_backend_is_not_reused(broker):
    torch_replica = admit(broker, ask())
    broker.registry.served(torch_replica.replica_id, 1, 0.1, None)
    on_vllm = admit(broker, PlacementRequest("bo", "bio", "llm", "v1", "generate", "chicago", SU // 100, 0,
                                             backend="vllm"))
    assert on_vllm.cold and on_vllm.replica_id.endswith("/vllm/0")


def test_explanation_names_every_candidate(broker):
    text = broker.decide(ask(project="astro", identity="ana")).explain()
    assert text.startswith("placed on ")
    for site in ("near", "far", "lab"):
        assert f"  {site}: new replica" in text
    assert "network 0.050" in text and "cold start 20.000" in text and "free (own site)" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sites": [{"name": "a", "billing": "byo"}]}, "needs an owner"),
        ({"sites": [{"name": "a", "owner": "astro"}]}, "only byo sites have an owner"),
        ({"prices": {"generate": {"per_1k_prompt_tokens": -1}}}, "per_1k_prompt_tokens"),
        ({"latency_ms": {}}, "no distance between 'chicago' and site 'far'"),
        ({"projects": [{"name": "astro"}, {"name": "x", "allocations": {"moon": 5}}]}, "unknown site 'moon'"),
        ({"projects": [{"name": "astro"}, {"name": "x", "allocations": {"near": -5}}]}, "negative"),
        ({"models": [{"name": "m", "path": "p", "sites": ["moon"]}]}, "unknown site 'moon'"),
        ({"models": [{"name": "m", "path": "p"}, {"name": "m", "path": "q"}]}, "duplicate models names: m"),
        ({"sites": [{"name": "a", "capacity": {"max_replicas": 0}}]}, "max_replicas"),
    ],
)
def test_malformed_federations_name_the_field(tmp_path, change, message):
    import yaml

    raw = federation().model_dump(mode="json")
    raw.update(change)
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))
    from tpm_fed.protocol.errors import FederationConfigError

    with pytest.raises(FederationConfigError, match=message):
        Federation.load(Path(path))


def test_placing_holds_the_estimate_until_the_batch_reservation_says_how_it_went(broker):
    # bio has 100 SUs at far; placing writes nothing, but holds each estimate in this process.
    placed = [broker.place(f"p{i}", ask(estimate=30 * SU)) for i in range(3)]
    assert {a.site for a in placed} == {"far"} and not any(a.reserved for a in placed)
    assert broker.ledger.statement() == [] and broker.ledger.balances("bio")[0].reserved_usu == 0
    with pytest.raises(InsufficientBalance, match="lacks the SUs"):  # 10 left after three holds of 30
        broker.place("p3", ask(estimate=30 * SU))
    replica = broker.registry.get(placed[0].replica_id)
    assert replica.queue_depth == 3
    refused = broker.ledger.reserve_many([a.hold() for a in placed[:2]])
    broker.reserved(placed, refused={"p2"})  # p2 was refused at reservation (say): its hold goes back
    assert refused == {} and replica.queue_depth == 2
    reserved = placed[0].estimate_usu + placed[1].estimate_usu  # the first pays a cold start too
    assert broker.ledger.balances("bio")[0].reserved_usu == reserved
    assert broker.balances.available("bio", "far") == 100 * SU - reserved
    assert broker.place("p4", ask(estimate=39 * SU)).site == "far"


def test_concurrent_placements_at_a_cold_start_never_refuse_nor_start_past_capacity(broker):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Barrier(32)

    def slow_probe() -> None:  # widens the window between reading the registry and changing it
        time.sleep(0.002)

    broker.health.watch("far", slow_probe)

    def place(index: int) -> str:
        gate.wait()
        return broker.place(f"c{index}", ask()).replica_id

    with ThreadPoolExecutor(32) as pool:
        placed = list(pool.map(place, range(32)))
    assert len(placed) == 32  # none refused while a replica was starting
    assert len(set(placed)) <= 2 and broker.registry.live_per_site()["far"] <= 2  # the site holds 2
