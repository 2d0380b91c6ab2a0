"""The worker's end of the back channel: one WebSocket per running task, to the service and back.

The endpoint engine returns a task's result only when the task ends, so a
streamed request's text travels another way: the service names, in the
task's context, a URL and a secret made for this one task
(:class:`~tpm_fed.protocol.back_channel.ChannelAddress`). The worker opens one
WebSocket there (compute nodes connect out; nothing connects in to them),
says the secret first, and keeps it for the task's life. The frames both ways
are the contract's models (:mod:`tpm_fed.protocol.back_channel`), read by the
service as built here.

- Sending barely slows generation: a background thread sends whatever has
  piled up, merged per prompt, at most one frame every ``SEND_INTERVAL_S``;
  only a prompt's first text leaves at once.
- Where the service cannot be reached (no route back from a remote
  endpoint, or a host this endpoint's policy does not list), streaming and
  joining are off for the task and the final result carries everything.
- The final result stays the authority: the service sends whatever the
  chunks did not cover when the task ends, so the stream always adds up to
  the completion.
- The service pushes the requests whose callers left
  (:class:`~tpm_fed.protocol.back_channel.Cancelled`): the backend stops
  generating for them, their batch-mates go on, and they are charged for the
  tokens made until then.
- A request that finishes before its batch does is *answered* on the channel
  at once (``outcomes``, with the replica's ``served`` facts), so its caller
  need not wait for the slowest batch-mate; the task's result still carries
  every answer, and the service settles each request once, whichever comes
  first. Requests that joined the running task (:mod:`functions.joining`),
  pushed by the service on this same socket, are answered this way too.
- The channel survives a dropped connection: every frame is numbered and
  kept until the service says it has it (:mod:`tpm_fed.protocol.back_channel`).
  When the socket drops, the worker opens another with the task's secret and
  the resume key the service gave it (up to ``RECONNECT_TRIES`` times, backing
  off), and sends again what the service had not acknowledged; generation goes
  on meanwhile, its text piling up. Only if that fails does the task go on
  without the channel, as above.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from websockets.exceptions import (
    ConnectionClosed,
    InvalidMessage,
    InvalidStatus,
    WebSocketException,
)
from websockets.sync.client import ClientConnection, connect

from functions.policy import WorkerPolicy
from tpm_fed.protocol.back_channel import (
    MAX_FRAME_BYTES,
    SERVICE_FRAMES,
    Cancelled,
    ChannelAddress,
    EarlyAnswer,
    Hello,
    Joined,
    OpenToJoin,
    Received,
    Sent,
    Settled,
    TakeNoMore,
    Welcome,
)
from tpm_fed.protocol.task_reply import Outcome, ServedBy

logger = logging.getLogger(__name__)

SEND_INTERVAL_S = 0.02
"""Shortest time between two frames of text of one task (text piles up meanwhile, merged per prompt)."""

CONNECT_TIMEOUT_S = 10.0
"""Longest the worker waits for the service to accept its channel (then streaming and joining are off)."""

JOINS_END_TIMEOUT_S = 2.0
"""Longest a task's end waits for the service to confirm no more requests join (what it pushes after that is
not read, and goes back to the replica's queue)."""


KEEPALIVE_S = 20.0
"""The worker pings the service this often and gives a socket up when no pong comes within as long (websockets'
default, said here on purpose): it is how a worker finds a WAN link that died without a word (its sends alone
would only fail after TCP's retransmissions, minutes later), and the channel is then opened again. A busy engine
cannot make it miss one: while ``vllm.LLM`` generated 64 x 200 tokens in the same process (as in the worker),
pings took at most 10 ms and a thread waited at most 155 ms for the GIL (docs/performance.md, 2026-12-06).
The service's end pings too (uvicorn's ``ws_ping_interval``/``ws_ping_timeout``, 20 s each)."""

RECONNECT_TRIES = 8
"""How many sockets are tried after a drop before the task goes on without its channel (a socket the service
welcomes starts the count again)."""

RECONNECT_FIRST_S, RECONNECT_MOST_S = 0.1, 4.0
"""The wait before the first try after a drop, doubled at each try up to the second figure: about 14 s of waits
in all (more where a try waits for its connect timeout), so a WAN link back within that keeps the task's stream
and its joiners. The waits cost the task nothing: its engine runs on, and its end cuts them short."""

RESUMABLE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
"""Close codes after which the channel is opened again (a drop, a keepalive timeout, a restart); after another
(1000: its task ended; 4xxx: refused) it is not."""


class ChannelEnded(Exception):
    """The service closed the channel: its task ended there (nothing to open again, nothing failed)."""


def may_resume(error: Exception) -> bool:
    """Whether a socket that failed with ``error`` dropped (open another) rather than was refused or ended: a
    link that failed, or a handshake cut short or answered 5xx (a proxy, an overloaded service), but not one
    the service refused (4xx)."""
    if isinstance(error, ConnectionClosed):
        return error.rcvd is None or error.rcvd.code in RESUMABLE_CODES
    if isinstance(error, InvalidStatus):
        return error.response.status_code >= 500
    return isinstance(error, (OSError, TimeoutError, InvalidMessage))


def merged(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chunk per (request, prompt): their texts joined, in order."""
    joined: dict[tuple[str, int], dict[str, Any]] = {}
    for chunk in chunks:
        key = (chunk["request_id"], chunk["index"])
        if key in joined:
            joined[key]["text"] += chunk["text"]
        else:
            joined[key] = dict(chunk)
    return list(joined.values())


def socket_url(url: str) -> str:
    """The channel's ``http(s)://`` address as the WebSocket URL it is dialled at (``ws(s)://``)."""
    parts = urlsplit(url)
    return parts._replace(scheme={"https": "wss"}.get(parts.scheme, "ws")).geturl()


class BackChannel:
    """The task's channel, run by two background threads (one sends, one reads what the service pushes);
    opens a dropped socket again, and gives up for good if it cannot, or if the service refuses it.

    Args:
        url: The service's channel route (``http(s)://.../tpm/v1/channel``).
        token: The task's secret, checked by the service.
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = socket_url(url)
        self.token = token
        self.failed: str | None = None
        self.cancelled: set[str] = set()  # requests whose callers left: stop generating for them
        self.served: ServedBy | None = None  # the replica's facts, sent with answers (set by serve_batch)
        self.answers: dict[str, dict[str, Any]] = {}  # requests answered here, by id, until the service settled them
        self.joins_ended = threading.Event()  # no more requests will be pushed (or the channel failed)
        self._arrived: list[dict[str, Any]] = []  # requests pushed to join, not yet taken
        self._pending: list[dict[str, Any]] = []
        self._outcomes: list[EarlyAnswer] = []
        self._control: list[OpenToJoin | TakeNoMore] = []
        self._opened_to_join = False
        self._begun: set[tuple[str, int]] = set()  # (request, prompt) pairs that sent text already
        self._urgent = False
        self._wake = threading.Condition()
        self._closing = False
        self._seq = 0  # the last frame numbered
        self._unacked: deque[tuple[int, str]] = deque()  # sent, not yet acknowledged by the service: sent again
        self._took = 0  # the last service frame taken
        self._resume: str | None = None  # the service's resume key: without it a dropped channel is not reopened
        self._broken: Exception | None = None  # why this socket failed
        self._tries = 0  # sockets opened since the service last welcomed one
        self.reconnects = 0  # tries to open the channel again after a drop (the worker's log says each)
        self._thread = threading.Thread(target=self._run, name="tpm-channel-send", daemon=True)
        self._thread.start()

    @classmethod
    def for_task(cls, context: dict[str, Any] | None, policy: WorkerPolicy) -> BackChannel | None:
        """The task's back channel, if it names one this endpoint may send to."""
        try:
            address = ChannelAddress.model_validate((context or {}).get("stream"))
        except ValidationError:  # none named (or not one): the final result carries everything
            return None
        if not policy.may_stream_to(address.url):  # scheme, host and port, as the endpoint lists them
            return None
        return cls(address.url, address.token)

    def send(self, chunks: list[dict[str, Any]]) -> None:
        """Queue chunks (returns at once)."""
        if self.failed is None and chunks:
            with self._wake:
                idle = self._idle()
                self._pending.extend(chunks)
                urgent = False
                for chunk in chunks:  # a prompt's first text leaves at once: it is its caller's first token
                    key = (chunk["request_id"], chunk["index"])
                    if key not in self._begun:
                        self._begun.add(key)
                        urgent = True
                self._wake_sender(idle, urgent)

    def answer(self, request_id: str, outcome: dict[str, Any], run_s: float, urgent: bool = False) -> None:
        """Send one request's outcome now (it finished before its task); kept for the task's result too,
        until the service says it settled it (:class:`~tpm_fed.protocol.back_channel.Settled`). ``urgent``:
        someone waits for it (an interactive request), so it leaves at once, not with the next frame."""
        timed = {**outcome, "run_s": run_s}
        with self._wake:
            self.answers[request_id] = timed
            if self.failed is None:
                idle = self._idle()
                self._outcomes.append(EarlyAnswer(request_id=request_id, outcome=Outcome.model_validate(timed)))
                self._wake_sender(idle, urgent)

    def _idle(self) -> bool:
        """Whether the sender has nothing queued (it waits for something, not for its pace). Hold ``_wake``."""
        return not self._pending and not self._outcomes

    def _wake_sender(self, idle: bool, urgent: bool) -> None:
        """Wake the sender for what was just queued, if it must go before the sender's pace wakes it anyway:
        a wake per engine step costs the step's thread a GIL hand-off each time. Hold ``_wake``."""
        if urgent:
            self._urgent = True
        if urgent or idle:
            self._wake.notify_all()  # the worker may be waiting too (wait_joined)

    def unsettled(self) -> dict[str, dict[str, Any]]:
        """The answers the service has not said it settled, by request id (a copy: the reader may drop some)."""
        with self._wake:
            return dict(self.answers)

    def take_joined(self) -> list[dict[str, Any]]:
        """The requests (wire dicts) pushed to join since the last call; the first call asks the service to
        push them (returns at once)."""
        if not self._opened_to_join:
            self._opened_to_join = True
            with self._wake:
                if self.failed is None:  # opened again after take_no_more: joining has not ended now
                    self.joins_ended.clear()
            self._say(OpenToJoin())
        with self._wake:
            arrived, self._arrived = self._arrived, []
        return arrived

    def wait_joined(self, timeout_s: float) -> list[dict[str, Any]]:
        """:meth:`take_joined`, waiting up to ``timeout_s`` for a request to be pushed; returns at once
        once joining has ended (the service's window closed, or the channel failed)."""
        deadline = time.monotonic() + timeout_s
        arrived = self.take_joined()  # the first take also asks the service to push
        with self._wake:
            while not arrived and not self._arrived and not self.joins_ended.is_set() \
                    and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(left)
        return arrived + self.take_joined()

    def take_no_more(self, timeout_s: float = JOINS_END_TIMEOUT_S) -> list[dict[str, Any]]:
        """No more may join; the requests pushed before the service heard it (to be served too).

        If some came, the task runs on, and its next :meth:`take_joined` asks the service to push again:
        requests that reach the service meanwhile would otherwise wait for this task to drain and the next
        to start (seconds, for long rows), though this engine is running."""
        if not self._opened_to_join:
            return []
        self._say(TakeNoMore())
        ended = self.joins_ended.wait(timeout_s)
        with self._wake:
            arrived, self._arrived = self._arrived, []
            if ended and self.failed is None:  # the service has stopped pushing: joining may open again
                self._opened_to_join = False
        return arrived

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then close the socket (before the task's result leaves, so chunks come
        first)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()  # the worker may be waiting too (wait_joined)
        self._thread.join(timeout_s)

    def _say(self, frame: OpenToJoin | TakeNoMore) -> None:
        with self._wake:
            self._control.append(frame)
            self._urgent = True
            self._wake.notify_all()  # the worker may be waiting too (wait_joined)

    def _fail(self, error: Exception) -> None:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            # Said in the worker's log: from here the task's text comes only with its result, and requests
            # for its replica wait for it to end (a slow stream's cause is otherwise invisible).
            logger.warning("the task's back channel failed (%s): streaming and joining are off for this task",
                           self.failed)
        self._end_joins()

    def _end_joins(self) -> None:
        with self._wake:
            self.joins_ended.set()
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            self._broken, reader = None, None
            self._tries += 1  # back to 0 when the service welcomes the socket
            try:
                with connect(self.url, open_timeout=CONNECT_TIMEOUT_S, max_size=MAX_FRAME_BYTES,
                             compression=None,  # small JSON frames: deflate costs more than it saves
                             ping_interval=KEEPALIVE_S, ping_timeout=KEEPALIVE_S) as connection:
                    self._greet(connection)
                    reader = threading.Thread(target=self._read, args=(connection,), name="tpm-channel-read",
                                              daemon=True)
                    reader.start()
                    self._send_all(connection)
            except (OSError, WebSocketException, TimeoutError) as error:
                self._break(error)
            if reader is not None:
                reader.join(5.0)
            if self._broken is None or not self._retry(self._broken):  # closed, ended by the service, or failed
                break
        self._end_joins()
        with self._wake:  # nothing more will be sent
            self._pending, self._outcomes = [], []

    def _greet(self, connection: ClientConnection) -> None:
        """The secret first (and after a drop, the resume key), then what the service has not acknowledged."""
        # Frames go out back to back without waiting for a reply: without TCP_NODELAY, Nagle's
        # algorithm holds each small one until the last is acknowledged (up to 40 ms, delayed ACK).
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._wake:
            hello = Hello(token=self.token, resume=self._resume, received=self._took)
            again = [text for _, text in self._unacked]  # the service drops those it took already
        connection.send(hello.to_frame())
        for text in again:
            connection.send(text)

    def _retry(self, error: Exception) -> bool:
        """After ``error``: whether to open another socket (after a wait); if not, the channel has failed."""
        if isinstance(error, ChannelEnded):
            return False
        if self._closing or self._resume is None or not may_resume(error) or self._tries >= RECONNECT_TRIES:
            if not self._closing or not may_resume(error):
                self._fail(error)
            return False
        logger.warning("the task's back channel dropped (%s: %s); opening it again (try %d)",
                       type(error).__name__, error, self._tries + 1)
        self.reconnects += 1
        with self._wake:
            deadline = time.monotonic() + min(RECONNECT_FIRST_S * 2 ** self._tries, RECONNECT_MOST_S)
            while not self._closing and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(left)
        return not self._closing

    def _break(self, error: Exception) -> None:
        with self._wake:
            if self._broken is None:
                self._broken = error
            self._wake.notify_all()

    def _send_all(self, connection: ClientConnection) -> None:
        """Until the channel closes or this socket fails: frames, numbered and kept until acknowledged."""
        sent_at = float("-inf")
        while True:
            with self._wake:
                while not self._pending and not self._outcomes and not self._control and not self._closing \
                        and self._broken is None:
                    self._wake.wait()
                if self._broken is not None:
                    return
                # At most one frame of text per SEND_INTERVAL_S: a step takes milliseconds, and a frame per
                # step per batch costs the generating process more than the caller gains. A first token
                # does not wait: time to first token is what a streaming caller feels most.
                while not self._closing and not self._urgent and self._broken is None \
                        and (wait := sent_at + SEND_INTERVAL_S - time.monotonic()) > 0:
                    self._wake.wait(wait)
                self._urgent = False
                batch, self._pending = self._pending, []
                outcomes, self._outcomes = self._outcomes, []
                control, self._control = self._control, []
                closing = self._closing
                news: list[Sent | OpenToJoin | TakeNoMore] = list(control)
                if batch or outcomes:  # chunks first: a request's text reaches its caller before its end
                    news.insert(0, Sent(chunks=merged(batch), outcomes=outcomes,
                                        served=self.served if outcomes else None))
                frames: list[str] = []
                for frame in news:
                    self._seq += 1
                    frames.append(frame.model_copy(update={"seq": self._seq, "ack": self._took}).to_frame())
                    self._unacked.append((self._seq, frames[-1]))
            try:
                for text in frames:
                    connection.send(text)
                if frames and (batch or outcomes):
                    sent_at = time.monotonic()
            except (OSError, WebSocketException) as error:
                self._break(error)  # kept: sent again on the next socket
                return
            if closing:
                return

    def _acknowledged(self, seq: int) -> None:
        with self._wake:
            while self._unacked and self._unacked[0][0] <= seq:
                self._unacked.popleft()

    def _read(self, connection: ClientConnection) -> None:
        """What the service pushes: requests that join, callers who left, answers it settled, the end of joining;
        each numbered frame once (after a drop the service sends again what this end had not acknowledged)."""
        try:
            for message in connection:
                frame = SERVICE_FRAMES.validate_json(message)
                if isinstance(frame, Welcome):
                    self._resume, self._tries = frame.resume, 0
                    self._acknowledged(frame.received)
                    continue
                if isinstance(frame, Received):
                    self._acknowledged(frame.seq)
                    continue
                if frame.seq is not None:
                    if frame.seq <= self._took:
                        continue  # had it before the drop
                    self._took = frame.seq
                if isinstance(frame, Joined):
                    with self._wake:
                        self._arrived.extend(frame.requests)
                        self._wake.notify_all()
                elif isinstance(frame, Cancelled):
                    self.cancelled.update(frame.request_ids)
                elif isinstance(frame, Settled):  # the service has these: the task's result need not carry them
                    with self._wake:
                        for request_id in frame.request_ids:
                            self.answers.pop(request_id, None)
                else:
                    self._end_joins()
        except (OSError, WebSocketException, ValueError) as error:  # ValidationError is a ValueError
            if not self._closing:
                self._break(error)  # the sender stops; the channel is opened again if it dropped
                return
        self._end_joins()
        if not self._closing:
            self._break(ChannelEnded("the service closed the channel (its task ended)"))
