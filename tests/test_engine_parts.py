"""The dispatcher's parts on their own: the replica queue's decisions at made-up times (no clock, no
threads), a running task's exactly-once claims, the reply's decoding, and the lock rule."""

from __future__ import annotations

import ast
import gc
import inspect
import pkgutil
import weakref
from concurrent.futures import Future
from importlib import import_module

import pytest

import tpm_fed.engine as engine
from tests.test_dispatch import SPEC, reply_for, request
from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.engine.pending import Pending
from tpm_fed.engine.replica_queue import MAX_HOLD_S, MAX_LINGER_FACTOR, ReplicaQueue
from tpm_fed.engine.reply import ReplyReader, read_reply
from tpm_fed.engine.running_task import RunningTask
from tpm_fed.protocol.errors import RemoteExecutionError


def pending(text: str = "x", kind_request=None) -> Pending:
    return Pending(kind_request or request(text), Future(), submitted=0.0, nbytes=10)


def texts(batch: list[Pending]) -> list[str]:
    return [p.request.prompts[0] for p in batch]


def test_a_burst_lingers_while_requests_keep_arriving_then_leaves_as_one_batch():
    queue = ReplicaQueue(max_batch=8, max_in_flight=1, linger_s=0.001)
    assert queue.arrive(pending("a"), now=10.0) == [] and queue.linger_at == pytest.approx(10.001)
    assert queue.arrive(pending("b"), now=10.0008) == []  # still arriving
    assert queue.linger_over(now=10.001, held=False) == []  # quiet only since 10.0008: look again then
    assert queue.linger_at == pytest.approx(10.0018)
    batch = queue.linger_over(now=10.0019, held=False)
    assert texts(batch) == ["a", "b"] and queue.in_flight == 1 and queue.linger_at is None


def test_a_steady_trickle_cannot_hold_a_batch_past_the_linger_cap_but_a_held_burst_may_until_max_hold():
    queue = ReplicaQueue(max_batch=100, max_in_flight=1, linger_s=0.001)
    queue.arrive(pending(), now=0.0)
    t = 0.0
    while queue.linger_at is not None:  # a request arrives just before each linger ends
        t = queue.linger_at
        queue.arrive(pending(), now=t - 0.0001)
        if queue.linger_over(now=t, held=False):
            break
    assert t == pytest.approx(MAX_LINGER_FACTOR * 0.001, rel=0.1) and queue.in_flight == 1

    held = ReplicaQueue(max_batch=100, max_in_flight=1, linger_s=0.001)
    held.arrive(pending(), now=0.0)
    assert held.linger_over(now=1.0, held=True) == [] and held.linger_at == pytest.approx(1.001)
    assert len(held.linger_over(now=MAX_HOLD_S + 0.01, held=True)) == 1  # held no longer than MAX_HOLD_S


def test_slots_bound_tasks_in_flight_and_a_freed_slot_takes_the_next_batch_interactive_first():
    queue = ReplicaQueue(max_batch=2, max_in_flight=1)
    assert texts(queue.arrive(pending("first"), now=0)) == ["first"]
    assert queue.arrive(pending("line 1"), now=0, background=True) == []
    assert queue.arrive(pending("now 1"), now=0) == [] and queue.arrive(pending("now 2"), now=0) == []
    assert queue.position(queue.background[0].request_id) == 3
    assert queue.estimated_start_s(3, service_s=2.0) == 4.0  # one batch ahead, after the running one
    assert texts(queue.free_slot()) == ["now 1", "now 2"] and queue.in_flight == 1
    assert texts(queue.free_slot()) == ["line 1"]
    assert queue.free_slot() == [] and queue.in_flight == 0


def test_only_kinds_that_join_are_handed_to_a_running_task_and_lines_only_into_room():
    from tpm_fed.protocol.requests import TraceRequest

    queue = ReplicaQueue(max_batch=8, max_in_flight=1, joins=frozenset({"generate"}))
    queue.arrive(pending("running"), now=0)
    trace = Pending(TraceRequest.create("m", prompts=["t"]), Future())
    for item, background in ((pending("now"), False), (trace, False), (pending("l1"), True), (pending("l2"), True)):
        queue.arrive(item, now=0, background=background)
    assert texts(queue.take_joining(room=2)) == ["now", "l1"]  # room counts the interactive one too
    assert [p.request.kind for p in queue.interactive] == ["trace"] and texts(list(queue.background)) == ["l2"]
    queue.hand_back([pending("unread")])
    assert queue.position(queue.interactive[0].request_id) == 1


def test_a_running_task_settles_each_request_once_whoever_claims_first():
    own, late = pending("own"), pending("late")
    task = RunningTask([own])
    task.join([late])
    assert task.claim_answered([late.request_id, late.request_id, "stranger"]) == [(late, True)]
    assert task.claim_answered([late.request_id]) == []
    assert task.close() and not task.close()
    assert task.claim_unanswered() == ([own], [])
    assert task.claim_unanswered() == ([], []) and task.running == 0


def test_a_long_lived_task_lets_each_request_go_once_settled():
    # A task may serve thousands of requests through the worker's idle wait: what it holds must not grow
    # with what it served (an early answer once scanned every request the task ever carried).
    own = [pending("own") for _ in range(3)]
    task = RunningTask(list(own))
    served = []
    for round_ in range(200):
        joined = [pending("joined") for _ in range(5)]
        served += [weakref.ref(p) for p in joined]
        task.join(joined)
        claimed = task.claim_answered([p.request_id for p in reversed(joined)] + [own[0].request_id])
        assert [(p.request_id, was_joined) for p, was_joined in claimed] == \
            [(p.request_id, True) for p in reversed(joined)] + ([(own[0].request_id, False)] if round_ == 0 else [])
        del joined, claimed
    gc.collect()
    assert task.held == 2 and task.running == 2  # the two own requests not answered yet
    assert not [ref for ref in served if ref() is not None]  # every settled request let go
    assert task.claim_unanswered() == (own[1:], []) and task.held == 0


@pytest.mark.parametrize("reply", [None, [], {"outcomes": "no"}, {"outcomes": [{}, {}]}, {"outcomes": [{"result": 1}]}])
def test_a_malformed_reply_fails_its_requests_typed(reply):
    batch = [pending()]
    outcomes = ReplyReader(SPEC, "s").task(batch, read_reply(reply, 1), finished=1.0)
    assert len(outcomes) == 1 and isinstance(outcomes[0], RemoteExecutionError)


def test_a_good_reply_gives_each_request_its_result_with_the_replica_facts():
    batch = [pending("a"), pending("b")]
    results = ReplyReader(SPEC, "s").task(batch, read_reply(reply_for(batch), 2), finished=3.0)
    assert [r.texts for r in results] == [["ok"], ["ok"]]
    assert results[0].site == "s" and results[0].version == "v" and results[0].timings.queue_s == pytest.approx(2.99)


def test_every_method_that_needs_the_lock_checks_it_holds_it():
    unchecked = []
    for module in pkgutil.iter_modules(engine.__path__):
        tree = ast.parse(inspect.getsource(import_module(f"tpm_fed.engine.{module.name}")))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_locked"):
                first = node.body[1] if isinstance(node.body[0].value, ast.Constant) else node.body[0]
                if "assert_held" not in ast.unparse(first):
                    unchecked.append(f"{module.name}.{node.name}")
    assert unchecked == []

    class Site:
        name = "s"

    dispatcher = ReplicaDispatcher(Site(), SPEC, max_batch=1, max_in_flight=1)
    with pytest.raises(AssertionError, match="lock"):
        dispatcher._follow_linger_locked()
