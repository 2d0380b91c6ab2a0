"""A replica's worker slot always comes back: no path through sending a batch can keep it.

With ``max_in_flight=1`` a slot that is never given back stalls the replica for
good: every later request waits forever. Each test here takes a path off the
happy one (a caller who cancelled, then a refused reservation; a back channel
that cannot be opened) and then checks that the next request is served.
"""

from __future__ import annotations

import pytest

from tests.test_dispatch import SPEC, VLLM_SPEC, Federated, HeldSite, reply_for, request
from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.protocol.errors import InsufficientBalance

WAIT_S = 5  # a stalled replica never answers: every wait here is bounded, so a stall fails instead of hanging


def test_a_cancelled_request_refused_at_reservation_gives_its_worker_slot_back(tmp_path):
    world = Federated(tmp_path)  # one worker: max_in_flight=1
    _, first = world.send(world.SU // 4)  # takes the only slot
    _, cancelled = world.send(world.SU // 4)  # waits for the slot
    assert cancelled.cancel()  # its caller gave up while it waited
    # Meanwhile another process spends the grant: the waiting request's reservation will be refused.
    world.broker.ledger.reserve("elsewhere", project="p", site="held", identity="v", model="m", version="v",
                                kind="generate", estimate_usu=world.SU * 3 // 4)
    world.answer(0)  # the slot passes to the cancelled request, whose reservation is refused
    first.result(timeout=WAIT_S)
    world.broker.ledger.release("elsewhere", "done elsewhere")
    world.broker.balances.refresh()

    _, after = world.send(world.SU // 4)
    assert len(world.site.tasks) == 2, "the worker slot was never given back: the replica is stalled"
    world.answer(1)
    assert after.result(timeout=WAIT_S).texts == ["ok"]
    assert cancelled.cancelled()


class Refusing:
    """A recorder that refuses the requests it is told to (as the ledger refuses an overdrawn one)."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()

    def record_sent(self, site, version, requests):
        return {r.request_id: InsufficientBalance("refused at reservation")
                for r in requests if r.request_id in self.refuse}

    def record_outcomes(self, outcomes):
        return outcomes


def test_a_cancelled_request_refused_beside_others_leaves_them_served_and_the_slot_usable():
    site, recorder = HeldSite(), Refusing()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=8, max_in_flight=1, recorder=recorder)
    first = dispatcher.submit(request("first"))
    gone, kept = request("gone"), request("kept")
    recorder.refuse.add(gone.request_id)
    gone_future, kept_future = dispatcher.submit(gone), dispatcher.submit(kept)
    assert gone_future.cancel()
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert first.result(timeout=WAIT_S).texts == ["ok"]
    assert [r["prompts"] for r in site.tasks[1][1]] == [["kept"]]  # the refused one was left out, the rest sent
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert kept_future.result(timeout=WAIT_S).texts == ["ok"]
    later = dispatcher.submit(request("later"))
    assert len(site.tasks) == 3
    site.tasks[2][0].set_result(reply_for(site.tasks[2][1]))
    assert later.result(timeout=WAIT_S).texts == ["ok"]


class BrokenHub:
    """A back-channel hub that cannot open a channel (its first open raises)."""

    def __init__(self) -> None:
        self.opened = 0

    def open(self, request_ids, joins=None):
        self.opened += 1
        if self.opened == 1:
            raise OSError("no back channel today")
        return {"url": "http://127.0.0.1:1/tpm/v1/channel", "token": f"t{self.opened}"}

    def close(self, token) -> None:
        pass


def test_a_task_that_cannot_be_started_fails_its_requests_and_gives_its_slot_back():
    site, hub = HeldSite(), BrokenHub()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub)
    failed = dispatcher.submit(request("first"))  # the caller gets a future, not the hub's exception
    with pytest.raises(OSError, match="no back channel"):
        failed.result(timeout=WAIT_S)
    assert site.tasks == []
    after = dispatcher.submit(request("after"))
    assert len(site.tasks) == 1, "the worker slot was never given back: the replica is stalled"
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert after.result(timeout=WAIT_S).texts == ["ok"]


def test_every_caller_future_is_settled_through_one_helper():
    """``set_result``/``set_exception`` on a caller's future raise once it was cancelled: only ``resolve``
    (which skips a future already done) may call them in the engine."""
    import ast
    import inspect
    import pkgutil
    from importlib import import_module

    import tpm_fed.engine as engine

    direct = []
    for module in pkgutil.iter_modules(engine.__path__):
        tree = ast.parse(inspect.getsource(import_module(f"tpm_fed.engine.{module.name}")))
        helpers = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "resolve"]
        inside_helper = {id(node) for helper in helpers for node in ast.walk(helper)}
        direct += [f"{module.name}:{node.lineno}" for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and node.func.attr in ("set_result", "set_exception")
                   and id(node) not in inside_helper
                   and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "task")]
    assert direct == [], f"the engine settles a future directly at {direct}"
