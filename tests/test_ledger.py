"""The ledger: exact, charged once, never below zero, under threads and processes."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import event

from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest
from tpm_fed.federation import Price
from tpm_fed.ledger import Hold, Ledger, Metered, estimate_usu, price_usu
from tpm_fed.protocol.requests import UsageBound, prompt_token_bound
from tpm_fed.state.database import open_database
from tpm_fed.state.schema import MICRO


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["returning", "rowcount"])
def ledger(url, request) -> Ledger:
    """Both ways a transition finds the rows it changed: UPDATE ... RETURNING, or one rowcount per row."""
    ledger = Ledger(open_database(url))
    ledger._returning = request.param == "returning"
    ledger.sync_grants({("p", "s"): 10.0})
    return ledger


def hold(request_id, estimate, project="p", site="s", free=False) -> Hold:
    return Hold(request_id, project, site, "u", "m", "v", "generate", estimate, free)


def reserve(ledger, request_id, estimate, **extra):
    ledger.reserve(request_id, project="p", site="s", identity="u", model="m", version="v",
                   kind="generate", estimate_usu=estimate, **extra)


def test_prices_are_exact_integers_and_estimates_bound_the_charge():
    price = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5)
    assert price_usu(price, Metered(prompt_tokens=1000)) == MICRO
    assert price_usu(price, Metered(prompt_tokens=1, completion_tokens=1, cold_start=True)) == 1000 + 2000 + 500_000
    estimate = estimate_usu(price, UsageBound(prompt_token_bound(["The cell divides"]), 32), cold_start=False)
    assert estimate >= price_usu(price, Metered(prompt_tokens=5, completion_tokens=32))


def test_reserve_settle_and_statement(ledger):
    reserve(ledger, "r1", 3 * MICRO)
    (balance,) = ledger.balances()
    assert (balance.reserved_usu, balance.available_usu) == (3 * MICRO, 7 * MICRO)
    assert ledger.settle("r1", Metered(prompt_tokens=10, completion_tokens=4), MICRO) == MICRO
    (balance,) = ledger.balances()
    assert (balance.spent_usu, balance.reserved_usu, balance.available_usu) == (MICRO, 0, 9 * MICRO)
    (line,) = ledger.statement()
    assert (line.state, line.charged_usu, line.prompt_tokens, line.completion_tokens) == ("settled", MICRO, 10, 4)


def test_settlement_is_idempotent(ledger):
    reserve(ledger, "r1", 2 * MICRO)
    assert ledger.settle("r1", Metered(), MICRO) == MICRO
    assert ledger.settle("r1", Metered(), MICRO) == 0
    assert ledger.release("r1", "late failure") is False
    assert ledger.balances()[0].spent_usu == MICRO


def test_charge_never_exceeds_the_estimate(ledger):
    reserve(ledger, "r1", MICRO)
    assert ledger.settle("r1", Metered(), 5 * MICRO) == MICRO
    assert ledger.balances()[0].spent_usu == MICRO
    assert "capped at the estimate; priced at 5.000000" in ledger.statement()[0].note


def test_release_returns_the_reservation(ledger):
    reserve(ledger, "r1", 4 * MICRO)
    assert ledger.release("r1", "worker failed")
    assert ledger.balances()[0].available_usu == 10 * MICRO
    assert ledger.statement()[0].state == "released"
    assert ledger.settle("r1", Metered(), MICRO) == 0


def test_insufficient_balance_is_refused_and_changes_nothing(ledger):
    with pytest.raises(InsufficientBalance, match="10.000000 SUs available"):
        reserve(ledger, "big", 11 * MICRO)
    assert ledger.balances()[0].reserved_usu == 0
    assert ledger.statement() == []


def test_unknown_allocation_is_refused(ledger):
    with pytest.raises(InsufficientBalance, match="0.000000 SUs available at site 'elsewhere'"):
        ledger.reserve("x", project="p", site="elsewhere", identity="u", model="m", version="v",
                       kind="generate", estimate_usu=1)


def test_duplicate_request_id_is_refused(ledger):
    reserve(ledger, "r1", 1)
    with pytest.raises(InvalidRequest, match="already charged"):
        reserve(ledger, "r1", 1)
    assert ledger.balances()[0].reserved_usu == 1


def test_free_on_own_site_records_usage_without_touching_allocations(ledger):
    reserve(ledger, "mine", 5 * MICRO, free=True)
    assert ledger.settle("mine", Metered(prompt_tokens=7, completion_tokens=3), 2 * MICRO) == 0
    (line,) = ledger.statement()
    assert (line.free, line.charged_usu, line.prompt_tokens) == (True, 0, 7)
    assert ledger.balances()[0].available_usu == 10 * MICRO


def test_grants_follow_the_federation_file(ledger):
    reserve(ledger, "r1", MICRO)
    ledger.settle("r1", Metered(), MICRO)
    ledger.sync_grants({("p", "s"): 20.0})
    assert ledger.balances()[0].available_usu == 19 * MICRO


def test_a_batch_is_reserved_in_one_transaction_and_each_request_refused_on_its_own(ledger):
    reserve(ledger, "earlier", MICRO)
    begins = []
    event.listen(ledger.engine, "begin", begins.append)
    refused = ledger.reserve_many([
        hold("a", 4 * MICRO), hold("b", 4 * MICRO), hold("c", 4 * MICRO), hold("d", MICRO), hold("twice", MICRO),
        hold("mine", 50 * MICRO, free=True), hold("x", 1, site="elsewhere"), hold("twice", MICRO),
    ])
    assert len(begins) == 1
    # The group does not fit as a whole (14 > 9 available): request by request, in order.
    assert {rid: type(e).__name__ for rid, e in refused.items()} == {
        "twice": "InvalidRequest", "c": "InsufficientBalance", "x": "InsufficientBalance"}
    assert "0.000000 SUs available at site 'elsewhere'" in str(refused["x"])
    assert "1.000000 SUs available at site 's'; this request may cost up to 4.000000" in str(refused["c"])
    (balance,) = ledger.balances()
    assert balance.reserved_usu == (1 + 4 + 4 + 1) * MICRO and balance.available_usu == 0
    assert sorted(c.request_id for c in ledger.statement()) == ["a", "b", "d", "earlier", "mine"]


def test_an_id_already_charged_is_refused_in_a_batch_and_the_rest_reserved_once(ledger):
    reserve(ledger, "earlier", MICRO)
    refused = ledger.reserve_many([hold("new", 2 * MICRO), hold("earlier", 3 * MICRO)])
    assert {rid: str(e) for rid, e in refused.items()} == {"earlier": "request earlier was already charged"}
    (balance,) = ledger.balances()
    assert balance.reserved_usu == 3 * MICRO  # 1 (earlier, once) + 2 (new); the insert that failed was rolled back
    assert sorted(c.request_id for c in ledger.statement()) == ["earlier", "new"]


def test_a_batch_settles_and_releases_in_one_transaction_each_request_once(ledger):
    ledger.reserve_many([hold(f"r{i}", MICRO) for i in range(4)] + [hold("own", MICRO, free=True)])
    begins = []
    event.listen(ledger.engine, "begin", begins.append)
    with ledger.engine.begin() as db:
        charged = ledger.settle_many([("r0", Metered(prompt_tokens=2), MICRO // 2), ("r1", Metered(), 3 * MICRO),
                                      ("own", Metered(completion_tokens=9), MICRO), ("nobody", Metered(), 1)], db)
        released = ledger.release_many([("r2", "worker failed"), ("r0", "too late"), ("r1", "too late")], db)
    assert len(begins) == 1
    assert charged == {"r0": MICRO // 2, "r1": MICRO, "own": 0, "nobody": 0}
    assert released == {"r2": True, "r0": False, "r1": False}
    assert ledger.settle_many([("r0", Metered(), MICRO), ("r3", Metered(), MICRO // 4)]) == {"r0": 0, "r3": MICRO // 4}
    lines = {c.request_id: c for c in ledger.statement()}
    assert {rid: c.state for rid, c in lines.items()} == {
        "r0": "settled", "r1": "settled", "r2": "released", "r3": "settled", "own": "settled"}
    assert (lines["r0"].prompt_tokens, lines["own"].completion_tokens, lines["r2"].note) == (2, 9, "worker failed")
    assert "capped at the estimate" in lines["r1"].note
    (balance,) = ledger.balances()
    assert balance.spent_usu == MICRO // 2 + MICRO + MICRO // 4
    assert balance.reserved_usu == 0 and balance.available_usu == 10 * MICRO - balance.spent_usu


def test_a_failed_batch_transaction_reserves_nothing(ledger):
    with pytest.raises(RuntimeError), ledger.engine.begin() as db:
        assert ledger.reserve_many([hold("a", MICRO), hold("b", MICRO)], db) == {}
        raise RuntimeError("the request log could not be written")
    assert ledger.balances()[0].reserved_usu == 0 and ledger.statement() == []


def drain(ledger, estimate, cost) -> int:
    """Reserve and settle one at a time until refused: what concurrency left over."""
    count = 0
    while True:
        try:
            reserve(ledger, f"drain{count}", estimate)
        except InsufficientBalance:
            return count
        ledger.settle(f"drain{count}", Metered(), cost)
        count += 1


def test_eight_threads_cannot_overspend_or_double_charge(ledger):
    def attempt(index: int) -> bool:
        try:
            reserve(ledger, f"t{index}", MICRO // 2)
        except InsufficientBalance:
            return False
        ledger.settle(f"t{index}", Metered(), MICRO // 4)
        ledger.settle(f"t{index}", Metered(), MICRO // 4)
        return True

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(200)))
    drained = drain(ledger, MICRO // 2, MICRO // 4)
    balance = ledger.balances()[0]
    settled = [c for c in ledger.statement() if c.state == "settled"]
    assert sum(outcomes) + drained == len(settled) > 0
    # Each settled request charged once, exactly; nothing lost; nothing left reserved;
    # and the allocation was used until no further 0.5-SU reservation fitted.
    assert balance.spent_usu == sum(c.charged_usu for c in settled) == len(settled) * (MICRO // 4)
    assert balance.reserved_usu == 0
    assert 0 <= balance.available_usu < MICRO // 2


def test_several_processes_cannot_overspend_or_double_charge(ledger, url):
    worker = Path(__file__).with_name("ledger_worker.py")
    root = str(Path(__file__).parent.parent)
    processes = [
        subprocess.Popen([sys.executable, str(worker), url, f"proc{n}", "30", str(MICRO // 2), str(MICRO // 5)],
                         stdout=subprocess.PIPE, text=True, cwd=root, env={"PYTHONPATH": root, "PATH": ""})
        for n in range(4)
    ]
    counts = [tuple(map(int, p.communicate(timeout=120)[0].split())) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    drained = drain(ledger, MICRO // 2, MICRO // 5)
    settled = [c for c in ledger.statement() if c.state == "settled"]
    assert sum(s for s, _ in counts) + drained == len(settled) > 0
    balance = ledger.balances()[0]
    assert balance.spent_usu == sum(c.charged_usu for c in settled) == len(settled) * (MICRO // 5)
    assert balance.reserved_usu == 0
    assert 0 <= balance.available_usu < MICRO // 2
