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


def event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


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
    try:
        while True:
            arrival = asyncio.ensure_future(queue.queue.get())
            done, _ = await asyncio.wait({arrival, outcome}, return_when=asyncio.FIRST_COMPLETED)
            if arrival not in done:
                arrival.cancel()
                break
            chunk = arrival.result()
            sent[chunk["index"]] = sent.get(chunk["index"], "") + chunk["text"]
            yield event(delta(chunk["index"], chunk["text"]))
        while not queue.queue.empty():  # chunks that came with the result
            chunk = queue.queue.get_nowait()
            sent[chunk["index"]] = sent.get(chunk["index"], "") + chunk["text"]
            yield event(delta(chunk["index"], chunk["text"]))
        try:
            result = outcome.result()
        except TpmError as error:
            yield event(http_error(error).body())
        except Exception as error:  # noqa: BLE001 - the caller hears of it in OpenAI's shape
            yield event({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error",
                                   "param": None, "code": "InternalError"}})
        else:
            for chunk in ending(result, sent, queue.received > 0):
                yield event(chunk)
        ended = True
        yield b"data: [DONE]\n\n"
    finally:
        forget(not ended)


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
