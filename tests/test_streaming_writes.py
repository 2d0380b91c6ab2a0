"""An event stream writes what has come in one go: each write is a pass through the middleware and a send.

vLLM's benchmark client keeps 64 streams open; at that load the service's event
loop, not its CPU, bounds the rate (docs/performance.md), and every write it
saves is loop time. The events themselves are unchanged: one per chunk, in order.
"""

from __future__ import annotations

import asyncio
import json

from tpm_fed.service.back_channel_hub import ChunkQueue
from tpm_fed.service.streaming import event, live_events


def _delta(index: int, text: str) -> dict:
    return {"choices": [{"index": index, "text": text, "finish_reason": None}]}


def _ending(result: str, sent: dict[int, str], streamed: bool) -> list[dict]:
    return [{"choices": [{"index": 0, "text": result[len(sent.get(0, "")):], "finish_reason": "length"}],
             "tpm": {"streamed": streamed}},
            {"choices": [], "usage": {"completion_tokens": len(result)}}]


async def _writes(feed) -> tuple[list[bytes], list[bool]]:
    """The stream's writes while ``feed(queue, outcome)`` puts chunks and resolves the outcome."""
    queue = ChunkQueue(asyncio.get_running_loop())
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()
    left: list[bool] = []
    writes: list[bytes] = []
    feeding = asyncio.ensure_future(feed(queue, outcome))
    async for write in live_events(queue, outcome, _delta, _ending, left.append):
        writes.append(write)
    await feeding
    return writes, left


def _events(writes: list[bytes]) -> list[str]:
    return [line for write in writes for line in write.decode().split("\n\n") if line]


def test_the_end_is_one_write_with_the_same_events():
    async def feed(queue, outcome):
        queue.put({"index": 0, "text": "ab"})
        await asyncio.sleep(0.01)
        outcome.set_result("abc")

    writes, left = asyncio.run(_writes(feed))
    assert len(writes) == 2  # the text as it came; then its end, the usage and [DONE] together
    assert writes[0] == event(_delta(0, "ab"))
    assert _events(writes[1:]) == [event(chunk).decode().strip() for chunk in _ending("abc", {0: "ab"}, True)] + [
        "data: [DONE]"]
    assert left == [False]


def test_chunks_that_came_together_are_one_write_of_one_event_each():
    async def feed(queue, outcome):
        for text in ("a", "b", "c"):
            queue.put({"index": 0, "text": text})
        await asyncio.sleep(0.01)
        queue.put({"index": 0, "text": "d"})
        await asyncio.sleep(0.01)
        outcome.set_result("abcd")

    writes, _ = asyncio.run(_writes(feed))
    assert writes[0] == b"".join(event(_delta(0, text)) for text in "abc")
    assert writes[1] == event(_delta(0, "d"))
    assert [json.loads(line[6:]) for line in _events(writes)[:-1]][-2]["choices"][0]["text"] == ""  # nothing left


def test_text_and_end_that_come_together_are_one_write():
    async def feed(queue, outcome):
        queue.put({"index": 0, "text": "x"})
        outcome.set_result("x")

    writes, _ = asyncio.run(_writes(feed))
    assert len(writes) == 1
    lines = _events(writes)
    assert lines[0] == event(_delta(0, "x")).decode().strip() and lines[-1] == "data: [DONE]"
