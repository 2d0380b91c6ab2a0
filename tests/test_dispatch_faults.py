"""Bad replies and failed writes: exactly the affected requests fail, typed; nothing is charged twice or stranded."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from tests.test_dispatch import Federated, reply_for
from tpm_fed.ledger.sweeper import ReservationSweeper
from tpm_fed.protocol.errors import RemoteExecutionError

LATER = 10 * 86400.0  # past every reservation's deadline


def no_reservation_left(world) -> None:
    (balance,) = world.broker.ledger.balances()
    assert balance.reserved_usu == 0
    assert [c.request_id for c in world.broker.ledger.statement() if c.state == "reserved"] == []


@pytest.mark.parametrize("spoil,failed", [
    (lambda reply: reply["outcomes"].__setitem__(1, {"result": {"completions": "garbage"}}), [1]),
    (lambda reply: reply["outcomes"].__setitem__(2, "not an outcome"), [2]),
    (lambda reply: reply["outcomes"].__setitem__(0, {"error": ["not", "an", "error"]}), [0]),
    (lambda reply: reply["outcomes"].pop(), [0, 1, 2]),  # truncated: which answer is whose is unknown
    (lambda reply: reply.pop("replica"), [0, 1, 2]),
    (lambda reply: reply.clear(), [0, 1, 2]),
])
def test_a_malformed_reply_fails_the_requests_it_does_not_answer_typed_and_the_replica_serves_on(
        tmp_path, spoil, failed):
    world = Federated(tmp_path, grant_su=10)
    _, first = world.send(world.SU // 4)  # leaves alone; three wait and leave together
    batch = [world.send(world.SU // 4) for _ in range(3)]
    world.answer(0)
    first.result(timeout=5)
    reply = reply_for(world.site.tasks[1][1])
    spoil(reply)
    world.site.tasks[1][0].set_result(reply)
    for index, (request_id, future) in enumerate(batch):
        if index in failed:
            with pytest.raises(RemoteExecutionError, match="malformed reply"):
                future.result(timeout=5)
            assert world.log.status_of(request_id) == "failed"
        else:
            assert future.result(timeout=5).charge.charged_su == 0.003
    states = {c.request_id: c.state for c in world.broker.ledger.statement()}
    assert [states[rid] for rid, _ in batch] == ["released" if i in failed else "settled" for i in range(3)]
    no_reservation_left(world)
    _, after = world.send(world.SU // 4)  # the dispatcher kept serving: this one leaves at once
    assert len(world.site.tasks) == 3
    world.answer(2)
    assert after.result(timeout=5).charge.charged_su == 0.003
    assert world.broker.registry.all()[0].queue_depth == 0


def fail_once(monkeypatch, target, name):
    real = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE charges", {}, Exception("the database went away"))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def sweeper(world) -> ReservationSweeper:
    return ReservationSweeper(world.broker.ledger, world.log, lambda: world.federation.prices, world.keeper.in_flight)


def test_a_failed_ledger_write_after_the_work_is_settled_by_the_sweeper_exactly_once(tmp_path, monkeypatch):
    world = Federated(tmp_path, grant_su=10)
    fail_once(monkeypatch, world.broker.ledger, "settle_many")
    request_id, future = world.send(world.SU // 4)
    world.answer(0)
    result = future.result(timeout=5)  # the caller has the answer; its charge is not settled yet
    assert result.charge is None and result.texts == ["ok"]
    (charge,) = world.broker.ledger.statement()
    assert charge.state == "reserved"
    assert world.log.status_of(request_id) == "done"  # what the work used, kept on its own
    assert world.broker.registry.all()[0].queue_depth == 0
    assert sweeper(world).sweep().settled == {}  # before its deadline: not in doubt yet
    assert [c.request_id for c in world.broker.ledger.in_doubt(time.time() + LATER)] == [request_id]
    swept = sweeper(world).sweep(time.time() + LATER)
    assert swept.settled == {request_id: 3000} and swept.released == []
    again = sweeper(world).sweep(time.time() + LATER)
    assert again.settled == {} and again.released == []
    (charge,) = world.broker.ledger.statement()
    assert (charge.state, charge.charged_usu, charge.prompt_tokens, charge.completion_tokens) == ("settled", 3000, 1, 1)
    (balance,) = world.broker.ledger.balances()
    assert (balance.spent_usu, balance.reserved_usu) == (3000, 0)


def test_when_nothing_of_the_outcome_could_be_written_the_sweeper_releases_it(tmp_path, monkeypatch):
    world = Federated(tmp_path, grant_su=10)
    real = world.log.record_outcomes  # the batch's write fails, and the log-only write after it
    monkeypatch.setattr(world.log, "record_outcomes", lambda *a, **k: (_ for _ in ()).throw(
        OperationalError("UPDATE requests", {}, Exception("still away"))))
    request_id, future = world.send(world.SU // 4)
    world.answer(0)
    assert future.result(timeout=5).texts == ["ok"]
    monkeypatch.setattr(world.log, "record_outcomes", real)
    assert world.log.status_of(request_id) == "queued"
    swept = sweeper(world).sweep(time.time() + LATER)
    assert swept.released == [request_id] and swept.settled == {}
    (charge,) = world.broker.ledger.statement()
    assert charge.state == "released" and "no outcome was recorded" in charge.note
    no_reservation_left(world)


def test_the_sweeper_leaves_the_requests_this_process_still_waits_on(tmp_path):
    world = Federated(tmp_path, grant_su=10)
    request_id, future = world.send(world.SU // 4)
    assert sweeper(world).sweep(time.time() + LATER).released == []  # in flight here: not in doubt
    world.answer(0)
    assert future.result(timeout=5).charge.charged_su == 0.003
    (charge,) = world.broker.ledger.statement()
    assert charge.state == "settled"


def test_a_caller_who_cancelled_does_not_keep_the_others_of_its_batch_from_their_answers(tmp_path):
    world = Federated(tmp_path, grant_su=10)
    _, first = world.send(world.SU // 4)
    batch = [world.send(world.SU // 4) for _ in range(3)]
    assert batch[0][1].cancel()  # still waiting for the worker: its caller gave up
    world.answer(0)
    first.result(timeout=5)
    world.answer(1)
    assert [f.result(timeout=5).texts for _, f in batch[1:]] == [["ok"], ["ok"]]
    _, after = world.send(world.SU // 4)
    world.answer(2)
    assert after.result(timeout=5).texts == ["ok"]
