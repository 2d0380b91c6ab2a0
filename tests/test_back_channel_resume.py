"""A running task's back channel survives a dropped connection (tests/tcp_proxy.py between worker and service).

- The worker opens the channel again with the task's secret and the resume key the service gave it; what was
  lost in flight is sent again and taken once, what had arrived is not taken twice (text, early answers, and
  requests pushed to join).
- Only the task's own worker may reopen it: a replayed secret, a guessed key or another task's secret is
  refused, and the new socket replaces the old one.

The real path (vLLM on the local site's worker, cut mid-stream) is tests/test_back_channel_resume_vllm.py's.
"""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from functions.back_channel import BackChannel, socket_url
from tests.service_helpers import ServiceThread
from tests.tcp_proxy import TcpProxy
from tests.test_back_channel import Hooks, loop, on  # noqa: F401 - loop is a fixture
from tpm_fed.protocol.back_channel import (
    CHANNEL_ROUTE,
    SERVICE_FRAMES,
    Hello,
    Received,
    Sent,
    Welcome,
)


@dataclass
class Proxied:
    url: str  # the service, directly
    headers: dict[str, str]
    proxy: TcpProxy  # the workers' way to it (the hub's worker URL)

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


@contextmanager
def behind_proxy(assembly):
    """``assembly`` served on loopback, its workers told to reach it through a TCP proxy the test can cut."""
    from tpm_fed.service.app import build_app, fastapi_app, serve_at
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    app = build_app(assembly, LocalToken(token, assembly.engine.owner))
    hub = fastapi_app(app).state.channels
    before = hub.worker_url
    with ServiceThread(app) as url:
        proxy = TcpProxy(int(url.rsplit(":", 1)[1]))
        serve_at(app, url, worker_url=f"http://127.0.0.1:{proxy.port}")
        try:
            yield Proxied(url, {"Authorization": f"Bearer {token}"}, proxy)
        finally:
            proxy.close()
            hub.worker_url = before


@pytest.fixture
def proxied(assembly):
    with behind_proxy(assembly) as served:
        yield served


def chunk(text: str) -> dict:
    return {"request_id": "own", "index": 0, "text": text}


def wait_until(condition, what, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def answered(hooks: Hooks) -> list[str]:
    return [rid for call in hooks.calls if call[0] == "answered" for rid in call[1]]


def test_text_and_answers_lost_in_flight_when_the_link_drops_arrive_once_after_it(proxied, runtime, loop):  # noqa: F811
    hub, hooks = runtime.channels, Hooks([])
    own = on(loop, lambda: hub.queue_for("own"))
    token = hub.open(["own"], hooks)["token"]
    hub.joined(token, ["early"])
    channel = BackChannel(proxied.worker_url + CHANNEL_ROUTE, token)
    try:
        channel.send([chunk("Hel")])
        wait_until(lambda: own.received == 1, lambda: own.received)  # taken, not yet acknowledged to the worker
        proxied.proxy.lose_client_bytes()  # from now on what the worker sends is lost on the wire
        channel.send([chunk("lo")])
        channel.answer("early", {"result": {"usage": {}}}, 0.1)
        time.sleep(0.5)  # they left the worker's socket
        assert own.received == 1 and answered(hooks) == []
        proxied.proxy.cut()
        channel.send([chunk(" world")])
        wait_until(lambda: own.received >= 3 and answered(hooks), lambda: (own.received, hooks.calls, channel.failed))
        time.sleep(0.5)  # anything sent twice would have come by now
        texts = [on(loop, own.queue.get_nowait)["text"] for _ in range(own.received)]
        assert "".join(texts) == "Hello world"  # nothing lost, nothing doubled
        assert answered(hooks) == ["early"]  # settled once
        assert channel.failed is None and proxied.proxy.connections_accepted == 2  # one socket more, the same channel
        channel.close()
        assert channel.failed is None
    finally:
        hub.close(token)
        hub.forget("own")


def test_requests_pushed_to_join_while_the_link_is_down_reach_the_worker_once(proxied, runtime):
    hub, hooks = runtime.channels, Hooks([["before"]])
    token = hub.open(["own"], hooks)["token"]
    channel = BackChannel(proxied.worker_url + CHANNEL_ROUTE, token)
    wire = lambda rid: {"request_id": rid, "kind": "generate"}
    try:
        assert channel.wait_joined(30) == [wire("before")]
        proxied.proxy.lose_server_bytes()  # what the service sends from now on is lost on the wire
        hooks.offers.append(["lost"])
        wait_until(lambda: sum(1 for call in hooks.calls if call[0] == "reserve") == 2, lambda: hooks.calls)
        time.sleep(0.5)
        assert channel.take_joined() == []
        proxied.proxy.cut()
        hooks.offers.append(["after"])  # pushed while the worker opens its next socket, or after
        joined: list = []
        deadline = time.monotonic() + 30
        while len(joined) < 2:
            joined += channel.wait_joined(1.0)
            assert time.monotonic() < deadline, (joined, hooks.calls, channel.failed)
        time.sleep(0.5)
        joined += channel.take_joined()
        assert joined == [wire("lost"), wire("after")]  # each once, in order
        assert "stop" not in hooks.calls  # the drop did not end joining
        assert channel.failed is None
        channel.close()
    finally:
        hub.close(token)


def closed(socket) -> int:
    """The code the service closes ``socket`` with (what it sends before is read and dropped)."""
    with pytest.raises(ConnectionClosed) as ended:
        while True:
            socket.recv(timeout=30)
    return ended.value.rcvd.code


def test_only_the_tasks_worker_may_reopen_its_channel_and_its_new_socket_replaces_the_old(service, runtime, loop):  # noqa: F811
    hub = runtime.channels
    own = on(loop, lambda: hub.queue_for("own"))
    token = hub.open(["own"], Hooks([]))["token"]
    url = socket_url(service.url + CHANNEL_ROUTE)
    try:
        with connect(url) as first:
            first.send(Hello(token=token).to_frame())
            welcome = SERVICE_FRAMES.validate_json(first.recv(timeout=30))
            assert isinstance(welcome, Welcome) and welcome.received == 0
            first.send(Sent(chunks=[chunk("a")], seq=1).to_frame())
            wait_until(lambda: own.received == 1, lambda: own.received)
            strangers = [(Hello(token=token), 4403),  # the secret replayed: it opened a channel once
                         (Hello(token=token, resume=secrets.token_urlsafe(32)), 4403),  # a guessed key
                         (Hello(token="not-a-task", resume=welcome.resume), 4401)]  # the key, another secret
            for hello, code in strangers:
                with connect(url) as stranger:
                    stranger.send(hello.to_frame())
                    assert closed(stranger) == code
            # The first socket still open as far as the service knows (a half-open link): the worker's new one
            # replaces it.
            with connect(url) as second:
                second.send(Hello(token=token, resume=welcome.resume, received=0).to_frame())
                again = SERVICE_FRAMES.validate_json(second.recv(timeout=30))
                assert again == Welcome(resume=welcome.resume, received=1)  # the service took frame 1
                assert closed(first) == 1000  # the service closed the replaced socket
                second.send(Sent(chunks=[chunk("a")], seq=1).to_frame())  # sent again: taken once
                second.send(Sent(chunks=[chunk("b")], seq=2).to_frame())
                wait_until(lambda: own.received == 2, lambda: own.received)
                second.send(Sent(chunks=[chunk("d")], seq=4).to_frame())  # frame 3 missing: refused, not taken
                assert closed(second) == 4400
        time.sleep(0.2)
        assert [on(loop, own.queue.get_nowait)["text"] for _ in range(own.received)] == ["a", "b"]
    finally:
        hub.close(token)
        hub.forget("own")


def test_a_channel_outlives_the_services_deadline_for_a_request_head(assembly, runtime):
    """The service closes a connection whose request head is late (tpm_fed.service.connections.HeaderDeadline);
    a channel's socket is past its head once upgraded, and lives on however long its task runs."""
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken
    from tpm_fed.service.connections import ConnectionLimits

    limits = ConnectionLimits(header_timeout_s=1.0)
    app = build_app(assembly, LocalToken(secrets.token_urlsafe(16), assembly.engine.owner))
    hub = runtime.channels
    before, token = hub.worker_url, None
    try:
        with ServiceThread(app, limits) as url:
            token = hub.open(["own"], Hooks([]))["token"]
            with connect(socket_url(url + CHANNEL_ROUTE)) as socket:
                socket.send(Hello(token=token).to_frame())
                assert isinstance(SERVICE_FRAMES.validate_json(socket.recv(timeout=30)), Welcome)
                time.sleep(3 * limits.header_timeout_s)
                for seq in range(1, 17):  # the service acknowledges every 16th frame: still open both ways
                    socket.send(Sent(chunks=[], seq=seq).to_frame())
                assert SERVICE_FRAMES.validate_json(socket.recv(timeout=30)) == Received(seq=16)
    finally:
        if token is not None:
            hub.close(token)
        hub.worker_url = before
