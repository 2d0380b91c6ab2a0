"""The back channel: one WebSocket per running task, opened by its worker, on the service's real route.

- A secret authenticates one socket for its own task: forged, replayed, ended and second uses are refused
  (typed close codes) and feed nothing; a frame may name only the task's own requests; frames are bounded.
- Joining is pushed: once the worker says its engine takes requests, what the task's hooks take is
  reserved and pushed at once, without an ask per request; "take no more" is answered after every push.
- The worker's end (:class:`functions.back_channel.BackChannel`) against the same route: chunks reach the
  caller's queue, pushed requests and cancellations reach the worker, early answers reach the hooks.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from functions.back_channel import BackChannel, socket_url
from tpm_fed.protocol.back_channel import (
    CHANNEL_ROUTE,
    MAX_FRAME_BYTES,
    SERVICE_FRAMES,
    EarlyAnswer,
    Hello,
    Joined,
    JoinsEnded,
    OpenToJoin,
    Received,
    Sent,
    TakeNoMore,
    Welcome,
)
from tpm_fed.protocol.task_reply import Outcome


@pytest.fixture
def loop():
    """An event loop of the test's own, for chunk queues (they belong to a loop, as in the service)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def on(loop, make):
    async def call():
        return make()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(5)


def closed_with(socket) -> int:
    """The close code the service ends ``socket`` with (it sends nothing before, but its welcome if it took
    the secret)."""
    with pytest.raises(ConnectionClosed) as closed:
        assert isinstance(SERVICE_FRAMES.validate_json(socket.recv(timeout=30)), Welcome)
        socket.recv(timeout=30)
    return closed.value.rcvd.code


def pushed(socket):
    """The next frame the service pushes on ``socket`` (its welcome and acknowledgements left out)."""
    while isinstance(frame := SERVICE_FRAMES.validate_json(socket.recv(timeout=30)), (Welcome, Received)):
        pass
    return frame


def channel_url(service) -> str:
    return socket_url(service.url + CHANNEL_ROUTE)


class Hooks:
    """A running task's joining hooks (what the dispatcher gives the hub), as a script: ``offers`` are
    what successive takes find, then None (no more may join)."""

    def __init__(self, offers: list[list[str]]) -> None:
        self.offers = offers
        self.calls: list = []
        self.stopped = threading.Event()

    async def take(self, wait_s):
        self.calls.append("take")
        while not self.offers:  # an offer made while a take waits is taken
            if self.stopped.is_set():
                return None
            await asyncio.sleep(0.01)
        return self.offers.pop(0)

    async def reserve(self, taken):
        self.calls.append(("reserve", taken))
        return [{"request_id": rid, "kind": "generate"} for rid in taken], True

    def reserve_now(self):  # nothing is handed over in a route's pass here: the takes have it all
        return None

    def hands_now(self, hand):
        self.hand = hand

    def stop_joining(self):
        self.calls.append("stop")
        self.stopped.set()

    def reopen_joining(self):
        self.calls.append("reopen")
        self.stopped.clear()

    def answered(self, served, outcomes):
        self.calls.append(("answered", sorted(outcomes)))


def test_forged_replayed_ended_and_misdirected_secrets_are_refused_and_feed_nothing(service, runtime, loop):
    hub = runtime.channels
    url = channel_url(service)
    assert hub.open(["someone"]) is None  # nothing in it streams and nothing may join it: no channel at all
    victim, own = on(loop, lambda: hub.queue_for("victim")), on(loop, lambda: hub.queue_for("own"))
    try:
        with connect(url) as socket:
            socket.send(Hello(token="not-a-task").to_frame())
            assert closed_with(socket) == 4401  # Unauthenticated
        with connect(url) as socket:  # a frame before the secret
            socket.send(Sent(chunks=[{"request_id": "victim", "index": 0, "text": "injected"}]).to_frame())
            assert closed_with(socket) == 4400
        token = hub.open(["own"])["token"]
        with connect(url) as socket:
            socket.send(Hello(token=token).to_frame())
            socket.send(Sent(chunks=[{"request_id": "own", "index": 0, "text": "mine"}]).to_frame())
            socket.send(Sent(chunks=[{"request_id": "own", "index": 0, "text": "and"},
                                     {"request_id": "victim", "index": 0, "text": "injected"}]).to_frame())
            assert closed_with(socket) == 4403  # NotPermitted: all or nothing
            with connect(url) as replayed:  # its task still runs, but its secret opened a channel once
                replayed.send(Hello(token=token).to_frame())
                assert closed_with(replayed) == 4403
        hub.close(token)
        with connect(url) as socket:
            socket.send(Hello(token=token).to_frame())
            assert closed_with(socket) == 4401  # its task ended
        assert on(loop, own.queue.get_nowait) == {"request_id": "own", "index": 0, "text": "mine"}
        assert own.queue.empty() and victim.queue.empty() and victim.received == 0
    finally:
        hub.forget("victim"), hub.forget("own")


def test_frames_are_bounded_and_must_be_the_contracts(service, runtime):
    hub = runtime.channels
    for frame, code in (("x" * (MAX_FRAME_BYTES + 1), 1009), ('{"type": "sent", "chunks": [], "pickle": "gASV"}', 4400),
                        ("not json", 4400)):
        token = hub.open(["a"], Hooks([]))["token"]
        with connect(channel_url(service), max_size=None) as socket:
            socket.send(Hello(token=token).to_frame())
            socket.send(frame)
            assert closed_with(socket) == code
        hub.close(token)


def test_joining_requests_are_pushed_as_taken_and_take_no_more_comes_after_the_last(service, runtime):
    hub, hooks = runtime.channels, Hooks([["j1"], ["j2", "j3"]])
    token = hub.open(["own"], hooks)["token"]
    try:
        with connect(channel_url(service)) as socket:
            socket.send(Hello(token=token).to_frame())
            time.sleep(0.2)
            assert hooks.calls == []  # nothing is taken until the worker says its engine takes joiners
            socket.send(OpenToJoin().to_frame())
            frames = [pushed(socket) for _ in range(2)]
            assert [frame.requests for frame in frames] == [[{"request_id": "j1", "kind": "generate"}],
                                                            [{"request_id": r, "kind": "generate"} for r in ("j2", "j3")]]
            assert all(isinstance(frame, Joined) for frame in frames)
            socket.send(Sent(outcomes=[EarlyAnswer(request_id="j2", outcome=Outcome(result={}, run_s=0.1))]).to_frame())
            socket.send(TakeNoMore().to_frame())
            assert isinstance(pushed(socket), JoinsEnded)
            deadline = time.monotonic() + 30
            while ("answered", ["j2"]) not in hooks.calls:  # settled off the event loop
                assert time.monotonic() < deadline, hooks.calls
                time.sleep(0.05)
            assert "stop" in hooks.calls
            hub.close(token)  # the task ended: the service closes its channel
            with pytest.raises(ConnectionClosed) as closed:
                pushed(socket)
            assert closed.value.rcvd.code == 1000
    finally:
        hub.close(token)


def test_the_workers_end_streams_takes_pushed_requests_and_hears_who_left(service, runtime, loop):
    hub, hooks = runtime.channels, Hooks([["joiner"]])
    own = on(loop, lambda: hub.queue_for("own"))
    token = hub.open(["own", "gone"], hooks)["token"]
    channel = BackChannel(service.url + CHANNEL_ROUTE, token)
    try:
        channel.send([{"request_id": "own", "index": 0, "text": "Hel"}, {"request_id": "own", "index": 0, "text": "lo"}])
        hub.forget("gone", abandoned=True)  # its caller left: the worker hears it
        deadline = time.monotonic() + 30
        joined = []
        while not joined or "gone" not in channel.cancelled:
            joined += channel.take_joined()
            assert time.monotonic() < deadline and channel.failed is None, (joined, channel.cancelled)
            time.sleep(0.02)
        assert joined == [{"request_id": "joiner", "kind": "generate"}]
        assert channel.take_no_more() == [] and channel.joins_ended.is_set()
        channel.answer("joiner", {"result": {"usage": {}}}, 0.5)
        channel.close()
        assert channel.failed is None
        texts = [on(loop, own.queue.get_nowait)["text"] for _ in range(own.received)]
        assert "".join(texts) == "Hello"
        deadline = time.monotonic() + 30
        while ("answered", ["joiner"]) not in hooks.calls:
            assert time.monotonic() < deadline, hooks.calls
            time.sleep(0.05)
    finally:
        hub.close(token)
        hub.forget("own")


def test_a_worker_whose_channel_is_refused_turns_streaming_and_joining_off(service, caplog):
    channel = BackChannel(service.url + CHANNEL_ROUTE, "not-a-task")
    channel.send([{"request_id": "own", "index": 0, "text": "x"}])
    assert channel.joins_ended.wait(30)
    assert channel.take_joined() == [] and channel.take_no_more(0.5) == []
    channel.close()
    assert channel.failed is not None and "4401" in channel.failed
    assert [r.message for r in caplog.records if "back channel failed" in r.message]  # said in the worker's log


def test_the_workers_idle_wait_wakes_on_a_push_and_returns_at_once_once_joining_ended(service, runtime):
    """A task whose engine ran dry waits a moment for the next request (functions.joining.IDLE_JOIN_WAIT_S):
    a push wakes it at once, and once the service ends joining it waits for nothing."""
    hub, hooks = runtime.channels, Hooks([["joiner"]])
    token = hub.open(["own"], hooks)["token"]
    channel = BackChannel(service.url + CHANNEL_ROUTE, token)
    try:
        started = time.monotonic()
        assert channel.wait_joined(60) == [{"request_id": "joiner", "kind": "generate"}]
        assert time.monotonic() - started < 20  # woken by the push, not by the end of the wait
        hooks.stopped.set()  # the service's window closes: it ends joining
        started = time.monotonic()
        assert channel.wait_joined(60) == [] and channel.joins_ended.is_set()
        assert time.monotonic() - started < 20
        channel.close()
        assert channel.failed is None
    finally:
        hub.close(token)


def test_a_long_lived_tasks_worker_keeps_only_the_answers_the_service_has_not_settled(service, runtime):
    """A task may serve thousands of requests (the worker's idle wait keeps it alive): the worker keeps each
    early answer for the task's result only until the service says it settled it, so neither the worker's
    memory nor the result the service reads at the task's end grows with what the task served."""
    from tpm_fed.service.back_channel_hub import SETTLED_EVERY

    served = [f"r{i}" for i in range(2 * SETTLED_EVERY + 5)]
    hub, hooks = runtime.channels, Hooks([])
    token = hub.open(["own"], hooks)["token"]
    hub.joined(token, served)  # they joined the running task (its own requests' answers stay with the worker)
    channel = BackChannel(service.url + CHANNEL_ROUTE, token)
    try:
        channel.answer("own", {"result": {"usage": {}}}, 0.1)
        for rid in served:
            channel.answer(rid, {"result": {"usage": {}}}, 0.1)
        deadline = time.monotonic() + 30
        while sum(len(call[1]) for call in hooks.calls if call[0] == "answered") < len(served) + 1 \
                or len(channel.answers) >= SETTLED_EVERY or len(hub._tasks[token].requests) > 1:
            assert time.monotonic() < deadline, (len(channel.answers), hooks.calls[-3:])
            time.sleep(0.05)
        assert [rid for call in hooks.calls if call[0] == "answered" for rid in call[1]].count("r0") == 1
        assert "own" in channel.unsettled()  # kept: the worker may answer its own requests apart (isolation)
        assert set(channel.unsettled()) - {"own"} < set(served)  # of the joined, only what was not acknowledged
        assert hub._tasks[token].requests == {"own"}  # nor does the service keep the ids of those it settled
        channel.close()
        assert channel.failed is None
    finally:
        hub.close(token)


def test_a_worker_that_runs_on_after_take_no_more_takes_requests_again(service, runtime):
    """The engine ran dry, the worker said take no more, and requests pushed meanwhile set it running again:
    what reaches the service next joins the running engine, instead of waiting for this task to drain and
    the next to start (one of the real model's first-token tails: seconds)."""
    hub, hooks = runtime.channels, Hooks([["as-it-stopped"]])
    token = hub.open(["own"], hooks)["token"]
    channel = BackChannel(service.url + CHANNEL_ROUTE, token)
    try:
        assert channel.wait_joined(30) == [{"request_id": "as-it-stopped", "kind": "generate"}]
        assert channel.take_no_more() == [] and "stop" in hooks.calls
        hooks.offers.append(["after"])  # reaches the service while the engine serves "as-it-stopped"
        assert channel.wait_joined(30) == [{"request_id": "after", "kind": "generate"}]
        assert hooks.calls.count("reopen") == 1
        hooks.offers.clear()
        assert channel.take_no_more() == [] and channel.joins_ended.is_set()  # and it may stop again
        channel.close()
        assert channel.failed is None
    finally:
        hub.close(token)
