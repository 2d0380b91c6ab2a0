"""A frame handed over in a route's pass goes out on the worker's socket in that pass (routes_channel._send_now).

The socket's writer runs at the loop's next turn, behind whatever the loop had queued first (the rest of a
burst of requests); a request handed to a running task in its route's pass is written at once instead. Frames
stay in order: nothing is written while a send is in progress, and a send the socket cannot take at once is
finished by a task that the writer waits for.
"""

from __future__ import annotations

import asyncio
import json

from tpm_fed.protocol.back_channel import Joined
from tpm_fed.service.channel_session import Session
from tpm_fed.service.routes_channel import _send_now, _write, run_now


class Socket:
    """A WebSocket's sending side; while ``gate`` is set and closed, a send waits for it (a full socket)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate: asyncio.Event | None = None

    async def send_text(self, text: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.sent.append(text)

    async def close(self) -> None:
        pass


def joined(request_id: str) -> Joined:
    return Joined(requests=[{"request_id": request_id, "kind": "generate"}])


def kinds_and_ids(sent: list[str]) -> list[tuple[str, str | None]]:
    frames = [json.loads(text) for text in sent]
    return [(frame["type"], (frame.get("requests") or [{}])[0].get("request_id")) for frame in frames]


def open_link(socket: Socket):
    session = Session(requests=set(), resume="resume")
    link = session.attach("token", 0)
    link.socket = socket
    return session, link


def test_a_frame_handed_over_is_written_in_the_same_pass():
    async def route_pass() -> list[str]:
        socket = Socket()
        session, link = open_link(socket)
        session.push(joined("now"))
        _send_now(link)
        return list(socket.sent)  # nothing awaited since: the loop has not turned

    assert kinds_and_ids(asyncio.run(route_pass())) == [("welcome", None), ("joined", "now")]


def test_a_send_that_must_wait_is_finished_first_and_the_writer_keeps_the_order():
    async def scenario() -> tuple[list[str], list[str]]:
        socket = Socket()
        socket.gate = asyncio.Event()  # the socket takes nothing for now
        session, link = open_link(socket)
        session.push(joined("first"))
        _send_now(link)
        assert socket.sent == [] and link.writing is not None  # begun, waiting in a task
        session.push(joined("second"))
        _send_now(link)  # a send is in progress: left to the writer, after it
        writer = asyncio.ensure_future(_write(socket, link))
        await asyncio.sleep(0.01)
        before = list(socket.sent)
        socket.gate.set()
        for _ in range(100):
            await asyncio.sleep(0.001)
            if len(socket.sent) == 3:
                break
        writer.cancel()
        return before, socket.sent

    before, sent = asyncio.run(scenario())
    assert before == []
    assert kinds_and_ids(sent) == [("welcome", None), ("joined", "first"), ("joined", "second")]


def test_run_now_runs_to_the_end_in_the_pass_or_finishes_in_a_task_as_asyncio_would():
    async def scenario() -> list[str]:
        steps: list[str] = []

        async def body(gate: asyncio.Event | None, result: asyncio.Future | None) -> None:
            steps.append("start")
            if gate is not None:
                await gate.wait()
            if result is not None:
                steps.append(f"read {await result}")
            steps.append("end")

        assert run_now(body(None, None)) is None and steps == ["start", "end"]
        gate, result = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = run_now(body(gate, result))
        assert task is not None and steps == ["start", "end", "start"]
        gate.set()
        await asyncio.sleep(0)
        result.set_result("it")
        await task
        return steps

    assert asyncio.run(scenario()) == ["start", "end", "start", "read it", "end"]
