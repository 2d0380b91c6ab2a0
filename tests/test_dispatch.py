"""The dispatcher on its own: batching under load, and tasks that never answer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.sites.base import SiteStatus


class HeldSite:
    """A site whose tasks finish only when the test says (or never)."""

    name = "held"

    def __init__(self) -> None:
        self.tasks: list[tuple[Future, list[dict]]] = []
        self.sent = threading.Event()

    def submit(self, function, model, requests, context):
        future: Future = Future()
        self.tasks.append((future, requests))
        self.sent.set()
        return future

    def status(self) -> SiteStatus:
        return SiteStatus(self.name, "test", "running", 1, len(self.tasks))

    def shutdown(self) -> None:
        pass


def reply_for(requests):
    return {
        "replica": {"replica_id": "r", "host": "h", "pid": 1, "warm": True, "batch_size": len(requests)},
        "backend": "torch", "load_s": 0.0, "run_s": 0.01, "notes": [],
        "outcomes": [{"result": {"completions": [{"text": "ok", "token_ids": [1], "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}} for _ in requests],
    }


SPEC = ModelSpec(name="m", version="v", path="/nowhere")


def request(text="x"):
    return GenerationRequest.create(text, "m", max_new_tokens=1)


def test_requests_arriving_while_busy_leave_together():
    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=64, max_in_flight=1)
    first = dispatcher.submit(request())
    later = [dispatcher.submit(request()) for _ in range(5)]
    assert len(site.tasks) == 1 and len(site.tasks[0][1]) == 1
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert first.result(timeout=5).texts == ["ok"]
    assert len(site.tasks) == 2 and len(site.tasks[1][1]) == 5  # the five went out as one batch
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert all(f.result(timeout=5).replica.batch_size == 5 for f in later)


def test_a_burst_lingers_into_one_batch_and_a_lone_request_still_leaves():
    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=64, max_in_flight=1, linger_s=0.05)
    burst = [dispatcher.submit(request()) for _ in range(5)]
    assert site.sent.wait(5) and [len(requests) for _, requests in site.tasks] == [5]
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert all(f.result(timeout=5).replica.batch_size == 5 for f in burst)
    site.sent.clear()
    alone = dispatcher.submit(request())
    assert site.sent.wait(5) and [len(requests) for _, requests in site.tasks] == [5, 1]
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert alone.result(timeout=5).texts == ["ok"]


def test_a_task_that_never_answers_fails_with_a_site_error_and_frees_the_worker():
    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=64, max_in_flight=1, task_timeout_s=0.2)
    lost = dispatcher.submit(request())
    with pytest.raises(SiteError, match="no answer within 0.2 s"):
        lost.result(timeout=5)
    after = dispatcher.submit(request())  # the slot was freed: this one is sent
    assert site.sent.wait(5) and len(site.tasks) == 2
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))  # the late answer is dropped
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert after.result(timeout=5).texts == ["ok"]


def test_queue_position_decreases_as_requests_ahead_leave():
    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=2, max_in_flight=1)
    running = dispatcher.submit(request())
    queued = [request() for _ in range(5)]
    futures = [dispatcher.submit(r) for r in queued]
    assert dispatcher.position(running_id := site.tasks[0][1][0]["request_id"]) is None  # sent: not waiting
    assert running_id not in {r.request_id for r in queued}
    assert [dispatcher.position(r.request_id) for r in queued] == [1, 2, 3, 4, 5]
    # Batches of two, one at a time, behind the running one: 1-2 wait one batch, 3-4 two, 5 three.
    assert [dispatcher.estimated_start_s(dispatcher.position(r.request_id), 2.0) for r in queued] == [2, 2, 4, 4, 6]

    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))  # the first answer: two more leave
    running.result(timeout=5)
    assert [dispatcher.position(r.request_id) for r in queued] == [None, None, 1, 2, 3]
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert [dispatcher.position(r.request_id) for r in queued] == [None] * 4 + [1]
    site.tasks[2][0].set_result(reply_for(site.tasks[2][1]))
    site.tasks[3][0].set_result(reply_for(site.tasks[3][1]))
    assert all(f.result(timeout=5).texts == ["ok"] for f in futures)
    assert dispatcher.position(queued[-1].request_id) is None and dispatcher.waiting == 0


def test_an_interactive_request_leaves_before_a_batchs_waiting_lines():
    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=2, max_in_flight=1)
    lines = [request(f"line {i}") for i in range(6)]
    line_futures = [dispatcher.submit(r, background=True) for r in lines]  # the first leaves at once
    person = request("a person waiting")
    asked = dispatcher.submit(person)
    assert [dispatcher.position(r.request_id) for r in lines] == [None, 2, 3, 4, 5, 6]
    assert dispatcher.position(person.request_id) == 1  # ahead of the five lines that came before it
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))  # the running task ends
    assert [r["request_id"] for r in site.tasks[1][1]] == [person.request_id, lines[1].request_id]
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert asked.result(timeout=5).texts == ["ok"]
    site.tasks[2][0].set_result(reply_for(site.tasks[2][1]))
    site.tasks[3][0].set_result(reply_for(site.tasks[3][1]))
    assert all(f.result(timeout=5).texts == ["ok"] for f in line_futures)
    assert [r["request_id"] for _, task in site.tasks for r in task] == [
        lines[0].request_id, person.request_id, *(r.request_id for r in lines[1:])]


def test_batches_are_capped_by_bytes_as_well_as_by_count():
    from tpm_fed.protocol.limits import MAX_PAYLOAD_BYTES

    site = HeldSite()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=64, max_in_flight=1)
    dispatcher.submit(request())
    big = "word " * (MAX_PAYLOAD_BYTES // 5 // 3)  # a third of a task each
    waiting = [dispatcher.submit(request(big)) for _ in range(4)]
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert [len(requests) for _, requests in site.tasks[1:]] == [2]  # two fit; the next two wait
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert [len(requests) for _, requests in site.tasks[2:]] == [2]
    site.tasks[2][0].set_result(reply_for(site.tasks[2][1]))
    assert all(f.result(timeout=5).texts == ["ok"] for f in waiting)


class Federated:
    """A dispatcher with the real bookkeeper, broker and ledger (SQLite) behind it, on a held site."""

    SU = 1_000_000

    def __init__(self, tmp_path, grant_su: float = 1.0) -> None:
        from tpm_fed.bookkeeping import Bookkeeper
        from tpm_fed.references.records import ReferenceRecords
        from tpm_fed.broker import Broker, ReplicaRegistry
        from tpm_fed.federation import Federation
        from tpm_fed.ledger import Ledger
        from tpm_fed.state import RequestLog, open_database

        self.federation = Federation.model_validate({
            "sites": [{"name": "held"}], "models": [{"name": "m", "path": "/nowhere"}],
            "projects": [{"name": "p", "members": ["u"], "allocations": {"held": grant_su}}],
        })
        engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
        self.broker = Broker(self.federation, Ledger(engine), ReplicaRegistry(engine))
        self.log = RequestLog(engine)
        self.keeper = Bookkeeper(self.log, self.broker, ReferenceRecords(engine, lambda site: None))
        self.site = HeldSite()
        self.dispatcher = ReplicaDispatcher(self.site, SPEC, max_batch=64, max_in_flight=1, recorder=self.keeper)

    def send(self, estimate_usu: int, r=None):
        from tpm_fed.broker import PlacementRequest

        r = r or request()
        admission = self.broker.place(r.request_id, PlacementRequest(
            "u", "p", "m", "v", "generate", "here", estimate_usu, 0, backend="auto"))
        self.keeper.admitted(admission, self.federation.prices.generate)
        return r.request_id, self.dispatcher.submit(r)

    def answer(self, task: int) -> None:
        self.site.tasks[task][0].set_result(reply_for(self.site.tasks[task][1]))


def test_a_request_that_lost_its_sus_since_placement_fails_uncharged_and_the_rest_of_its_batch_runs(tmp_path):
    from tpm_fed.protocol.errors import InsufficientBalance

    world = Federated(tmp_path)
    quarter = world.SU // 4
    first_id, first = world.send(quarter)  # leaves at once: the worker was free
    queued = [world.send(quarter) for _ in range(3)]  # placed on the snapshot: all four fit in 1 SU
    # Meanwhile another process reserves half the grant: the snapshot does not know yet.
    world.broker.ledger.reserve("elsewhere", project="p", site="held", identity="v", model="m", version="v",
                                kind="generate", estimate_usu=world.SU // 2)
    world.answer(0)
    assert first.result(timeout=5).charge.charged_su == 0.003
    (sent, sent_future), *lost = queued
    assert [len(requests) for _, requests in world.site.tasks] == [1, 1]  # one fitted; two were left out
    assert world.site.tasks[1][1][0]["request_id"] == sent
    for _, future in lost:
        with pytest.raises(InsufficientBalance, match="this request may cost up to 0.250000"):
            future.result(timeout=5)
    world.answer(1)
    assert sent_future.result(timeout=5).charge.charged_su == 0.003
    lines = {c.request_id: c for c in world.broker.ledger.statement()}
    assert all(rid not in lines for rid, _ in lost)  # never charged, never logged
    assert all(world.log.status_of(rid) is None for rid, _ in lost)
    assert world.log.status_of(sent) == world.log.status_of(first_id) == "done"
    (balance,) = world.broker.ledger.balances()
    assert (balance.spent_usu, balance.reserved_usu) == (2 * 3000, world.SU // 2)
    assert world.broker.balances._held == {("p", "held"): 0}
    replica = world.broker.registry.all()[0]
    assert (replica.state, replica.queue_depth) == ("warm", 0)


def test_a_replicas_cold_start_is_not_its_service_time_so_a_slow_load_does_not_skew_placement(tmp_path):
    """A replica's service time (what placement multiplies by its queue) is how long its tasks run: the
    seconds its first task spent loading the model are paid once, not by every request queued there later."""
    world = Federated(tmp_path)
    _, first = world.send(1000)
    cold = reply_for(world.site.tasks[0][1])
    cold["replica"]["warm"], cold["load_s"], cold["run_s"] = False, 9.0, 0.02
    world.site.tasks[0][0].set_result(cold)
    assert first.result(timeout=5).timings.load_s == 9.0
    replica = world.broker.registry.all()[0]
    assert replica.service_s == pytest.approx(0.7 * 1.0 + 0.3 * 0.02)  # the run alone, not 9.02 s


def test_a_batch_refused_whole_sends_no_task_and_frees_the_worker(tmp_path):
    from tpm_fed.protocol.errors import InsufficientBalance

    world = Federated(tmp_path)
    _, first = world.send(world.SU // 4)
    refused = [world.send(world.SU // 4) for _ in range(2)]
    world.broker.ledger.reserve("elsewhere", project="p", site="held", identity="v", model="m", version="v",
                                kind="generate", estimate_usu=world.SU * 3 // 4)
    world.answer(0)
    first.result(timeout=5)
    for _, future in refused:
        with pytest.raises(InsufficientBalance):
            future.result(timeout=5)
    assert len(world.site.tasks) == 1
    world.broker.ledger.release("elsewhere", "done elsewhere")
    world.broker.balances.refresh()
    _, after = world.send(world.SU // 4)  # the worker slot is free: sent at once
    assert len(world.site.tasks) == 2
    world.answer(1)
    assert after.result(timeout=5).charge.charged_su == 0.003


def test_a_request_in_flight_cannot_be_submitted_again(tmp_path):
    from tpm_fed.broker import PlacementRequest
    from tpm_fed.protocol.errors import InvalidRequest

    world = Federated(tmp_path)
    r = request()
    ask = PlacementRequest("u", "p", "m", "v", "generate", "here", world.SU // 4, 0)
    world.keeper.admitted(world.broker.place(r.request_id, ask), world.federation.prices.generate)
    with pytest.raises(InvalidRequest, match="in flight already"):
        world.keeper.admitted(world.broker.place(r.request_id, ask), world.federation.prices.generate)
    assert world.broker.balances._held == {("p", "held"): world.SU // 4}  # the second placement was undone
    first = world.broker.registry.all()[0]
    assert first.queue_depth == 1
    world.keeper.forget(world.broker.place("unsent", ask))  # placed, then its dispatcher could not be made
    assert world.broker.balances._held == {("p", "held"): world.SU // 4} and first.queue_depth == 1


def test_a_request_sent_again_after_it_ran_is_refused_and_charged_once(tmp_path):
    from tpm_fed.protocol.errors import InvalidRequest

    world = Federated(tmp_path)
    again = request()
    _, first = world.send(world.SU // 4, again)
    world.answer(0)
    first.result(timeout=5)
    _, other = world.send(world.SU // 4)  # leaves at once
    _, repeat = world.send(world.SU // 4, again)  # waits for the worker, then is refused when it would leave
    world.answer(1)
    assert other.result(timeout=5).charge.charged_su == 0.003
    with pytest.raises(InvalidRequest, match="already charged"):
        repeat.result(timeout=5)
    assert len(world.site.tasks) == 2
    lines = world.broker.ledger.statement()
    assert [c.request_id for c in lines].count(again.request_id) == 1
    (balance,) = world.broker.ledger.balances()
    assert (balance.spent_usu, balance.reserved_usu) == (2 * 3000, 0)
    assert world.broker.balances._held == {("p", "held"): 0}


class Hub:
    """A back-channel hub that keeps each task's joining hooks (as BackChannelHub.open does)."""

    def __init__(self) -> None:
        self.hooks: list = []

    def open(self, request_ids, joins=None):
        self.hooks.append(joins)
        return {"url": "http://127.0.0.1:1/tpm/v1/channel", "token": f"t{len(self.hooks)}"}

    def close(self, token) -> None:
        pass


class Ledger:
    """A recorder that counts what is reserved and settled, per request."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.settled: list[str] = []

    def record_sent(self, site, version, requests):
        self.sent.extend(r.request_id for r in requests)
        return {}

    def record_outcomes(self, outcomes):
        self.settled.extend(outcomes)
        return outcomes


def answer_for(requests):
    return {rid: outcome for rid, outcome in zip([r["request_id"] for r in requests],
                                                 reply_for(requests)["outcomes"], strict=True)}


VLLM_SPEC = ModelSpec(name="m", version="v", path="/nowhere", backend="vllm")


def test_waiting_requests_join_a_running_task_and_each_is_settled_once():
    from tpm_fed.protocol.requests import TraceRequest

    site, hub, ledger = HeldSite(), Hub(), Ledger()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=3, max_in_flight=1, recorder=ledger,
                                    channels=hub)
    first = dispatcher.submit(request("first"))
    interactive = [dispatcher.submit(request(f"now {i}")) for i in range(2)]
    lines = [dispatcher.submit(request(f"line {i}"), background=True) for i in range(2)]
    trace = dispatcher.submit(TraceRequest.create("m", prompts=["t"]))
    (hooks,) = hub.hooks
    joined, more = asyncio.run(hooks.join(0.0))
    # Every interactive request joins; batch lines only into room (max_batch 3: 1 + 2 running, none);
    # a trace cannot join a generate engine.
    assert more and [r["prompts"] for r in joined] == [["now 0"], ["now 1"]]
    assert dispatcher.waiting == 3
    hooks.answered(reply_for([]), answer_for(joined[:1]))  # one ends early, on the back channel
    assert interactive[0].result(timeout=5).texts == ["ok"] and not interactive[1].done()
    joined_more, _ = asyncio.run(hooks.join(0.0))  # that freed room for one line
    assert [r["prompts"] for r in joined_more] == [["line 0"]]
    reply = {**reply_for(site.tasks[0][1]), "joined": answer_for(joined + joined_more)}
    site.tasks[0][0].set_result(reply)  # the task's result repeats the early answer: settled once
    assert first.result(timeout=5).texts == interactive[1].result(timeout=5).texts == ["ok"]
    assert lines[0].result(timeout=5).replica.warm
    assert sorted(ledger.settled) == sorted(set(ledger.settled)) and len(ledger.settled) == 4
    assert set(ledger.settled) <= set(ledger.sent[:4])  # each reserved before it joined
    assert [len(requests) for _, requests in site.tasks] == [1, 2]  # the rest leave as the next task
    assert {r["prompts"][0] for r in site.tasks[1][1]} == {"line 1", "t"}
    assert not trace.done() and not lines[1].done()


class BusyLedger(Ledger):
    """A recorder whose database may be held by another writer (what writing_now() raises then)."""

    busy = False

    def record_sent(self, site, version, requests):
        if self.busy:
            from tpm_fed.state import WriterBusy

            raise WriterBusy("another writer holds the database")
        return super().record_sent(site, version, requests)


def test_an_interactive_request_is_handed_to_a_running_task_in_the_pass_that_queues_it():
    """A route queues an interactive request on the loop that serves a running task's channel: before submit
    returns it is taken, reserved and handed over, with no take woken on the loop and no thread (a take's wake
    waits behind the rest of a burst of requests). A batch line still waits for a take. Where the ledger would
    have to wait for another writer, the request goes back to the front of the queue, not reserved, and the
    task's take has it. (Without the hand-over, submit returns with the request still queued.)"""
    site, hub, ledger = HeldSite(), Hub(), BusyLedger()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, recorder=ledger, channels=hub)
    dispatcher.submit(request("running"))
    (hooks,) = hub.hooks
    handed: list[list] = []

    def hand() -> bool:  # what the channel's route registers (routes_channel._hand_now, less its socket)
        wires = hooks.reserve_now()
        if wires is None:
            return False
        handed.append([wire["prompts"] for wire in wires])
        return True

    hooks.hands_now(hand)

    async def route(text: str, background: bool = False) -> tuple[bool, int]:
        queued = request(text)
        dispatcher.submit(queued, background=background)
        return queued.request_id in ledger.sent, dispatcher.waiting

    assert asyncio.run(route("now")) == (True, 0) and handed == [[["now"]]]
    assert asyncio.run(route("line", background=True)) == (False, 1) and handed == [[["now"]]]
    ledger.busy = True
    assert asyncio.run(route("busy")) == (False, 2) and handed == [[["now"]]]
    ledger.busy = False
    joined, more = asyncio.run(hooks.join(0.0))
    assert more and [r["prompts"] for r in joined] == [["busy"], ["line"]]  # the person's first, as queued
    hooks.hands_now(None)
    assert asyncio.run(route("later")) == (False, 1)  # no hand-over registered: the take has it


def test_a_joined_request_settled_early_and_left_out_of_the_result_is_settled_once_and_not_run_again():
    """A long-lived task's worker drops the early answers the service said it settled (Settled frames), so the
    task's result no longer names them: such a request is not taken for one the worker never read."""
    site, hub, ledger = HeldSite(), Hub(), Ledger()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub, recorder=ledger)
    first = dispatcher.submit(request("first"))
    early = dispatcher.submit(request("early"))
    joined, _ = asyncio.run(hub.hooks[0].join(0.0))
    hub.hooks[0].answered(reply_for([]), answer_for(joined))  # answered on the channel, then dropped by the worker
    assert early.result(timeout=5).texts == ["ok"]
    site.tasks[0][0].set_result({**reply_for(site.tasks[0][1]), "joined": {}})
    assert first.result(timeout=5).texts == ["ok"]
    assert len(site.tasks) == 1 and dispatcher.waiting == 0  # not handed back: no second task runs it
    assert sorted(ledger.settled) == sorted({*ledger.settled}) and len(ledger.settled) == 2


def test_a_running_task_that_stopped_joining_may_reopen_until_it_ends():
    site, hub = HeldSite(), Hub()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub)
    dispatcher.submit(request("running"))
    (hooks,) = hub.hooks
    hooks.stop_joining()  # the worker's engine ran dry: take no more
    later = dispatcher.submit(request("later"))
    assert asyncio.run(hooks.join(0.0)) == ([], False)
    hooks.reopen_joining()  # what came as it stopped set its engine running again
    joined, more = asyncio.run(hooks.join(0.0))
    assert more and [r["prompts"] for r in joined] == [["later"]] and len(site.tasks) == 1
    site.tasks[0][0].set_result({**reply_for(site.tasks[0][1]), "joined": answer_for(joined)})
    assert later.result(timeout=5).texts == ["ok"]
    hooks.reopen_joining()  # too late: the task ended
    assert asyncio.run(hooks.join(0.0)) == ([], False)


def test_a_joined_request_the_worker_never_read_goes_back_to_the_queue_and_a_torch_task_takes_no_joiners():
    site, hub, ledger = HeldSite(), Hub(), Ledger()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub,
                                    recorder=ledger)
    dispatcher.submit(request())
    late = dispatcher.submit(request("late"))
    joined, _ = asyncio.run(hub.hooks[0].join(0.0))
    assert len(joined) == 1
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))  # no "joined": the handover was never read
    assert not late.done() and [r["prompts"] for r in site.tasks[1][1]] == [["late"]]  # the next task has it
    assert ledger.sent.count(joined[0]["request_id"]) == 1  # reserved and logged once, not again
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert late.result(timeout=5).texts == ["ok"]
    assert asyncio.run(hub.hooks[0].join(0.0)) == ([], False)  # an ended task takes nothing more

    torch_site, torch_hub = HeldSite(), Hub()
    torch_dispatcher = ReplicaDispatcher(torch_site, SPEC.model_copy(update={"backend": "torch"}), max_batch=8,
                                          max_in_flight=1, channels=torch_hub)
    torch_dispatcher.submit(request())
    assert torch_hub.hooks == [None]
    off = ReplicaDispatcher(HeldSite(), VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub,
                             join_for_s=0)
    off.submit(request())
    assert hub.hooks[-1] is None


def test_a_held_ask_is_answered_when_a_request_arrives_and_holds_no_thread_meanwhile():
    site, hub = HeldSite(), Hub()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub)
    dispatcher.submit(request("running"))

    async def ask_then_arrive():
        ask = asyncio.ensure_future(hub.hooks[0].join(5.0))
        await asyncio.sleep(0.05)
        assert not ask.done() and threading.active_count() == threads  # held on the loop, no thread parked
        asyncio.get_running_loop().call_soon(dispatcher.submit, request("late"))
        return await asyncio.wait_for(ask, 2.0)

    threads = threading.active_count()
    joined, more = asyncio.run(ask_then_arrive())
    assert more and [r["prompts"] for r in joined] == [["late"]]


BOTH = {"backend": "torch", "outcomes": [{"result": {}, "error": {"type": "InvalidRequest", "message": "m"}}]}


@pytest.mark.parametrize("reply", ["not a reply", {"backend": "torch", "outcomes": []}, BOTH])
def test_a_malformed_reply_is_a_typed_error_settled_once_and_the_replica_serves_on(reply):
    """The reply is read by the contract's own model (``reply_from_wire``): an outcome holding a result and
    an error at once is malformed, not read as its error."""
    from tpm_fed.protocol.errors import RemoteExecutionError

    site, ledger = HeldSite(), Ledger()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=8, max_in_flight=1, recorder=ledger)
    bad = dispatcher.submit(request("bad"))
    bad_id = site.tasks[0][1][0]["request_id"]
    site.tasks[0][0].set_result(reply)
    with pytest.raises(RemoteExecutionError, match="malformed reply"):
        bad.result(timeout=5)
    served = dispatcher.submit(request("next"))
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert served.result(timeout=5).texts == ["ok"]
    assert ledger.settled.count(bad_id) == 1 and len(ledger.settled) == 2


def test_a_malformed_reply_fails_the_requests_that_joined_its_task_too_each_once():
    from tpm_fed.protocol.task_reply import MalformedReply

    site, hub, ledger = HeldSite(), Hub(), Ledger()
    dispatcher = ReplicaDispatcher(site, VLLM_SPEC, max_batch=3, max_in_flight=1, recorder=ledger,
                                   channels=hub)
    first = dispatcher.submit(request("first"))
    joining = dispatcher.submit(request("joins"))
    taken, _ = asyncio.run(hub.hooks[0].join(0.0))
    assert [r["prompts"] for r in taken] == [["joins"]]
    site.tasks[0][0].set_result({"backend": "vllm", "outcomes": "not a list", "joined": {}})
    for future in (first, joining):
        with pytest.raises(MalformedReply):
            future.result(timeout=5)
    assert sorted(ledger.settled) == sorted(ledger.sent) and len(ledger.settled) == 2
    assert len(site.tasks) == 1  # the joined request was not sent again


def test_a_request_lost_with_its_site_goes_up_unsettled_and_other_failures_are_settled_here():
    """Rerouting is above the dispatchers: one the replica pool made reports a lost request by its future
    (the site error, its reservation kept, nothing recorded) for the pool to place again or settle."""
    from tpm_fed.protocol.errors import RemoteExecutionError

    site, ledger = HeldSite(), Ledger()
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=8, max_in_flight=1, recorder=ledger, lost_goes_up=True)
    lost = dispatcher.submit(request("lost"))
    site.tasks[0][0].set_exception(SiteError("the worker died"))
    with pytest.raises(SiteError, match="worker died"):
        lost.result(timeout=5)
    assert len(ledger.sent) == 1 and ledger.settled == []
    failed = dispatcher.submit(request("failed"))
    site.tasks[1][0].set_exception(RemoteExecutionError("the function raised"))
    with pytest.raises(RemoteExecutionError):
        failed.result(timeout=5)
    assert ledger.settled == [ledger.sent[1]]
