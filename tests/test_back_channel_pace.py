"""The worker's back channel paces its frames: text and a batch line's answer leave at most one frame every
``SEND_INTERVAL_S``, merged; a prompt's first text and an interactive request's answer leave at once (someone
waits for each). Against a WebSocket server that only greets the worker and notes when each frame came."""

from __future__ import annotations

import threading
import time

import pytest
from websockets.sync.server import serve

from functions import back_channel
from functions.back_channel import BackChannel
from functions.backends.base import EncodedRequest
from functions.joining import JoinableTask
from tpm_fed.protocol.back_channel import WORKER_FRAMES, Sent, Welcome
from tpm_fed.protocol.generation import BATCH_PRIORITY
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.results import Completion

INTERVAL_S = 2.0
"""The pace under test: long, so that "at once" and "with the next frame" cannot be confused on a busy machine."""


class Frames(list):
    """(arrival time, frame) pairs, and the server's URL."""

    url = ""


@pytest.fixture
def frames(monkeypatch):
    """(arrival time, frame) of each frame a worker sends, on a server at ``frames.url``."""
    monkeypatch.setattr(back_channel, "SEND_INTERVAL_S", INTERVAL_S)
    came = Frames()

    def handler(connection):
        connection.recv()  # the hello
        connection.send(Welcome(resume="key", received=0).to_frame())
        for message in connection:
            frame = WORKER_FRAMES.validate_json(message)
            if isinstance(frame, Sent):
                came.append((time.monotonic(), frame))

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        came.url = f"http://127.0.0.1:{server.socket.getsockname()[1]}/tpm/v1/channel"
        yield came
        server.shutdown()


def wait_for(frames, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(frames) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(frames) >= count, frames


def item(priority: int) -> EncodedRequest:
    request = GenerationRequest.create("The cell", "demo", max_new_tokens=2, priority=priority)
    return EncodedRequest(request=request, prompt_ids=[[1, 2]])


def answered(frame: Sent) -> list[str]:
    return [answer.request_id for answer in frame.outcomes]


def test_an_interactive_answer_leaves_at_once_and_a_batch_lines_with_the_next_frame(frames):
    channel = BackChannel(frames.url, "secret")
    task = JoinableTask(channel, encode=lambda request: request)
    person, line = item(0), item(BATCH_PRIORITY)
    done = [Completion(text="ab", token_ids=[5, 6], finish_reason="length")]
    try:
        channel.send([{"request_id": "own", "index": 0, "text": "first"}])  # a first token: at once
        wait_for(frames, 1)
        sent_at = frames[0][0]
        task.finished(line, done)  # a batch line: waits for the pace
        time.sleep(0.3)
        assert len(frames) == 1
        task.finished(person, done)  # someone waits: at once, and the line's answer with it
        wait_for(frames, 2)
        arrived, frame = frames[1]
        assert arrived - sent_at < INTERVAL_S / 2
        assert answered(frame) == [line.request.request_id, person.request.request_id]
        task.finished(item(BATCH_PRIORITY), done)
        wait_for(frames, 3)
        assert frames[2][0] - arrived >= INTERVAL_S * 0.9  # a line's answer alone keeps the pace
    finally:
        channel.close()
