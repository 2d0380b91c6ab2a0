"""Server-sent events in OpenAI's shape: ``data: {chunk}`` lines, then ``data: [DONE]``.

:func:`live_events` sends text as the replica makes it. Chunks from the back
channel (:mod:`tpm_fed.service.back_channel_hub`) are sent as they arrive; when the
request's result comes, whatever the chunks did not cover is sent, so the
stream always adds up to the completion (also where the worker could not
reach the service: then everything comes in that last chunk, and its
``tpm.streamed`` says false). An error after the stream began is sent as an
``error`` event, as OpenAI's clients expect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from tpm_fed.protocol.errors import TpmError
from tpm_fed.protocol.http_errors import http_error

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class LiveStream(StreamingResponse):
    """An event stream of OpenAI chunks (see :func:`live_events`)."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=HEADERS)


COMPACT = (",", ":")
"""JSON without spaces, as vLLM's and OpenAI's servers write their chunks."""


def event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk, separators=COMPACT)}\n\n".encode()


async def live_events(
    queue: Any,
    outcome: asyncio.Task,
    delta: Callable[[int, str], dict[str, Any]],
    ending: Callable[[Any, dict[int, str], bool], list[dict[str, Any]]],
    forget: Callable[[bool], None],
) -> AsyncIterator[bytes]:
    """Chunks as they come, then the ending.

    Args:
        queue: Where the back channel puts this request's chunks (a :class:`~tpm_fed.service.back_channel_hub.ChunkQueue`).
        outcome: Resolves with the request's result.
        delta: (prompt index, new text) -> the chunk to send.
        ending: (result, text sent per prompt index, whether anything streamed) -> the last chunks.
        forget: Stop queueing its chunks (called however the stream ends); its argument says whether the
            caller left before the end (then the worker may stop generating for it).
    """
    sent: dict[int, str] = {}
    ended = False
    came: list[dict[str, Any]] = []
    try:
        while True:
            arrival = asyncio.ensure_future(queue.queue.get())
            done, _ = await asyncio.wait({arrival, outcome}, return_when=asyncio.FIRST_COMPLETED)
            if arrival not in done:
                arrival.cancel()
                break
            # One write for what has come by now: each write is a pass through the middleware and a send.
            came = [arrival.result(), *_queued(queue.queue)]
            if outcome.done():  # the end came too: sent with it
                break
            yield b"".join(_deltas(came, sent, delta))
            came = []
        last = _deltas([*came, *_queued(queue.queue)], sent, delta)  # chunks that came with the result
        try:
            result = outcome.result()
        except TpmError as error:
            last.append(event(http_error(error).body()))
        except Exception as error:  # noqa: BLE001 - the caller hears of it in OpenAI's shape
            last.append(event({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error",
                                         "param": None, "code": "InternalError"}}))
        else:
            last.extend(event(chunk) for chunk in ending(result, sent, queue.received > 0))
        ended = True
        yield b"".join([*last, b"data: [DONE]\n\n"])
    finally:
        forget(not ended)


def _queued(queue: asyncio.Queue) -> list[dict[str, Any]]:
    """The chunks waiting in ``queue`` now, taken out."""
    chunks = []
    while not queue.empty():
        chunks.append(queue.get_nowait())
    return chunks


def _deltas(chunks: list[dict[str, Any]], sent: dict[int, str], delta: Callable[[int, str], dict[str, Any]]
            ) -> list[bytes]:
    """Each chunk's event, in order (one event per chunk, as vLLM's server sends one per step); noted in ``sent``."""
    events = []
    for chunk in chunks:
        sent[chunk["index"]] = sent.get(chunk["index"], "") + chunk["text"]
        events.append(event(delta(chunk["index"], chunk["text"])))
    return events


async def stream_answer(
    serving: Any,
    request: Any,
    identity: str,
    delta: Callable[[int, str], dict[str, Any]],
    ending: Callable[[Any, dict[int, str], bool], list[dict[str, Any]]],
) -> LiveStream:
    """Queue ``request``'s text as it comes, start it (a refusal is an HTTP error, not a stream), then stream.

    Args:
        serving: A serving class with ``runtime``, ``observer`` and ``channels`` (the hub, which knows the
            service's own worker URL).
        delta, ending: As :func:`live_events` takes them.
    """
    from tpm_fed.service.serving import start

    queue = serving.channels.queue_for(request.request_id)
    try:
        outcome = await start(serving.runtime, request, identity, serving.observer)
    except BaseException:
        serving.channels.forget(request.request_id)
        raise
    return LiveStream(live_events(queue, outcome, delta, ending,
                                  lambda left: serving.channels.forget(request.request_id, abandoned=left)))


def remainder(text: str, sent: str) -> str:
    """What the final text adds to what was streamed (the final text is the authority)."""
    return text[len(sent):] if text.startswith(sent) else text
