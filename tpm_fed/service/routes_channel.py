"""The back channel's route: one WebSocket per running task, opened by its worker (see back_channel_hub).

No bearer token: the first frame's ``token`` is the secret the service made for the running task, and it
authenticates this socket for that task alone. Everything runs on the event loop, with no thread hop per
frame: a frame's chunks go straight into their callers' queues, and requests that join the task are pushed
as they are taken from its replica's queue. A socket is only the channel's current carrier
(:class:`~tpm_fed.service.channel_session.Session`): a worker frame is taken once, by its number, and the
task's joiner outlives a dropped socket (what it pushes meanwhile goes out on the worker's next one).
Only what touches the ledger leaves the loop: reserving a
joining request (:data:`tpm_fed.engine.asks.RESERVING`) and settling an early answer (:data:`SETTLING`),
but for an interactive request the route that queued it hands over in its own pass, where the database
takes it at once (:meth:`tpm_fed.engine.joining.Joining.join_now`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from tpm_fed.engine.pending import Pending
from tpm_fed.protocol.back_channel import (
    CHANNEL_ROUTE,
    MAX_FRAME_BYTES,
    REFUSED,
    WORKER_FRAMES,
    Hello,
    Joined,
    JoinsEnded,
    OpenToJoin,
    Sent,
)
from tpm_fed.protocol.errors import TpmError
from tpm_fed.service.back_channel_hub import BackChannelHub
from tpm_fed.service.channel_session import Link, running_loop

logger = logging.getLogger(__name__)

router = APIRouter()

SETTLING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tpm-settle-early")
"""Settles early answers (a ledger transaction) off the event loop; threads start on first use."""

TAKE_WAIT_S = 1.0
"""How long one take waits for a request before it looks at the task's joining deadline again."""

TOO_LARGE = 1009
INVALID = 4400


class FrameTooLarge(ValueError):
    """A frame over :data:`MAX_FRAME_BYTES`."""


@router.websocket(CHANNEL_ROUTE)
async def channel(socket: WebSocket) -> None:
    hub: BackChannelHub = socket.app.state.channels
    await socket.accept()
    try:
        link = hub.connect(Hello.model_validate_json(await _frame(socket)))
    except WebSocketDisconnect:
        return
    except (TpmError, ValueError) as error:  # ValidationError is a ValueError
        await _refuse(socket, error)
        return
    link.socket = socket
    writer = asyncio.create_task(_write(socket, link))
    clean = False
    try:
        while link.current:
            frame = WORKER_FRAMES.validate_json(await _frame(socket))
            if isinstance(frame, Hello):
                raise ValueError("the channel is open already")  # noqa: TRY004 (a frame the contract refuses here)
            if not link.current or not link.session.take(frame.seq, frame.ack):
                continue  # a newer socket carries it, or the worker sent it again after a drop: taken before
            if isinstance(frame, Sent):
                _deliver(hub, link, frame)
            elif isinstance(frame, OpenToJoin):
                _open_to_join(hub, link)
            elif link.session.joiner is None or link.session.joiner.done():  # TakeNoMore, no joiner running
                link.push(JoinsEnded())
            else:  # TakeNoMore: the joiner pushes what it reserved, then JoinsEnded
                link.joins.stop_joining()  # type: ignore[union-attr]
    except WebSocketDisconnect as gone:
        clean = gone.code == 1000  # the worker closed it (its task ends); else it dropped, and may come back
        if not clean and link.current:  # said in the service's log: the worker's says whether it came back
            logger.warning("a running task's back channel dropped (close code %s); kept for its worker to reopen",
                           gone.code)
    except (TpmError, ValueError) as error:
        await _refuse(socket, error)
    finally:
        writer.cancel()
        hub.disconnect(link, clean)


def _open_to_join(hub: BackChannelHub, link: Link) -> None:
    session = link.session
    if link.joins is None:
        link.push(JoinsEnded())  # nothing may join this task
    elif session.joiner is None:
        session.joiner = asyncio.create_task(_push_joins(hub, link))
    elif session.joiner.done():  # open again after a TakeNoMore answered: its engine runs on
        link.joins.reopen_joining()
        session.joiner = asyncio.create_task(_push_joins(hub, link))


async def _frame(socket: WebSocket) -> str:
    message = await socket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        text = (message.get("bytes") or b"").decode()  # UnicodeDecodeError: a ValueError
    if len(text) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"a frame over {MAX_FRAME_BYTES} bytes")
    return text


def _deliver(hub: BackChannelHub, link: Link, frame: Sent) -> None:
    """Chunks into their queues now; early answers checked now and settled off the loop."""
    chunks = [chunk.model_dump() for chunk in frame.chunks]
    if not frame.outcomes:
        hub.deliver(link.token, chunks)
        return
    outcomes = {answer.request_id: answer.outcome.to_wire() for answer in frame.outcomes}
    hub.check(link.token, [chunk["request_id"] for chunk in chunks] + list(outcomes))  # all or nothing
    if chunks:
        hub.deliver(link.token, chunks)
    served = frame.served.model_dump(exclude_none=True) if frame.served is not None else None
    SETTLING.submit(_settle, hub, link.token, outcomes, served)


def _settle(hub: BackChannelHub, token: str, outcomes: dict[str, dict[str, Any]], served: dict[str, Any] | None
            ) -> None:
    try:
        hub.deliver(token, [], outcomes, served)
    except TpmError:  # the task ended meanwhile: its result settles these
        pass
    except Exception:
        logger.exception("could not settle %d early answers", len(outcomes))


async def _write(socket: WebSocket, link: Link) -> None:
    """The socket's one writer: the channel's frames in order; closes the socket once its task ended (after
    the last frame) or a newer socket carries the channel."""
    try:
        while True:
            await link.wake.wait()
            link.wake.clear()
            while link.writing is not None:  # a hand-over's frame that had to wait: what is due now goes after
                await asyncio.wait({link.writing})
            texts, closing = link.due()
            if texts:
                link.writing = asyncio.get_running_loop().create_future()
                try:
                    await _send_all(socket, texts)
                finally:
                    link.writing.set_result(None)
                    link.writing = None
            if closing:
                await socket.close()
                return
    except (WebSocketDisconnect, RuntimeError, OSError):  # the socket is gone: the reader sees it too
        pass


async def _push_joins(hub: BackChannelHub, link: Link) -> None:
    """Take requests for the task as they are queued and push each batch once reserved; the next take is
    open while the last is reserved, so the task never has none open. Ends when no more may join, or its
    task ends. Outlives ``link`` (the first socket): what it pushes goes on whichever socket carries the
    channel."""
    joins = link.joins
    assert joins is not None
    reserving: set[asyncio.Task] = set()
    joins.hands_now(lambda: _hand_now(hub, link))
    try:
        while (taken := await joins.take(TAKE_WAIT_S)) is not None:
            if taken:
                reserving.add(asyncio.ensure_future(_reserve_and_push(hub, link, taken)))
                reserving = {task for task in reserving if not task.done()}
    finally:
        joins.hands_now(None)
        if reserving:
            await asyncio.wait(reserving)  # never cancels them: a taken request is always reserved or settled
    link.push(JoinsEnded())


async def _reserve_and_push(hub: BackChannelHub, link: Link, taken: list[Pending]) -> None:
    wires, _ = await link.joins.reserve(taken)  # type: ignore[union-attr]
    _push(hub, link, wires)


def _hand_now(hub: BackChannelHub, link: Link) -> bool:
    """In the pass of the route that queued an interactive request, on this channel's loop: hand it over now
    (taken, reserved, and written to the socket carrying the channel). False where it cannot be done without
    waiting: the joiner's take has it."""
    if running_loop() is not link.loop or link.joins is None:
        return False
    wires = link.joins.reserve_now()
    if wires is None:
        return False
    _push(hub, link, wires)
    if (carrier := link.session.link) is not None:
        _send_now(carrier)
    return True


def _send_now(link: Link) -> None:
    """In the caller's pass, on the loop: send what is due on ``link``'s socket now, not at the writer's next
    turn of the loop (which comes after whatever the loop had queued: the rest of a burst of requests). Only
    where no send is in progress (it would go out of order); a send the socket cannot take at once is finished
    by a task, which the writer waits for."""
    if link.writing is not None or link.socket is None or not link.current:
        return  # the writer sends it: push() woke it
    texts, _ = link.due()
    if not texts:
        return
    try:
        unfinished = run_now(_send_all(link.socket, texts))
    except (WebSocketDisconnect, RuntimeError, OSError):  # the socket is gone: the reader sees it too
        return
    if unfinished is not None:
        link.writing = unfinished
        unfinished.add_done_callback(lambda _: _sent(link))


def _sent(link: Link) -> None:
    link.writing = None
    link.poke()


async def _send_all(socket: WebSocket, texts: list[str]) -> None:
    for text in texts:
        await socket.send_text(text)


def run_now(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task | None:
    """Run ``coroutine`` in the caller's pass, on the loop, to its end (None); if it must wait first (a
    socket not writable), a task finishes it from there, as its own task would have (returned)."""
    try:
        waiting = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_go_on(coroutine, waiting))


async def _go_on(coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Go on with ``coroutine`` where it waited on ``waiting`` (an asyncio future, or None: a bare yield), as
    asyncio's task does: resume it once that is done, and let it read the outcome itself."""
    try:
        while True:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # what a task does with the future its coroutine yields
                await asyncio.wait({waiting})
            try:
                waiting = coroutine.send(None)
            except StopIteration:
                return
    finally:
        coroutine.close()  # cancelled while waiting: it unwinds (nothing once it returned)


def _push(hub: BackChannelHub, link: Link, wires: list[dict[str, Any]]) -> None:
    if wires:
        hub.joined(link.token, [wire["request_id"] for wire in wires])  # its secret may answer these now
        link.push(Joined(requests=wires))


async def _refuse(socket: WebSocket, error: Exception) -> None:
    code = TOO_LARGE if isinstance(error, FrameTooLarge) else REFUSED.get(type(error).__name__, INVALID)
    try:
        await socket.close(code, str(error).encode()[:120].decode(errors="ignore"))  # a reason is <= 123 bytes
    except (RuntimeError, OSError):  # the socket is gone already
        pass
