"""A running task's back channel apart from the socket carrying it: what survives a dropped connection.

The service numbers each frame it pushes (:class:`Session.push`) and keeps it
until the worker acknowledges it (the ``ack`` on the worker's frames, or the
``received`` of its :class:`~tpm_fed.protocol.back_channel.Hello` on a new
socket); it takes each numbered worker frame once (:meth:`Session.take`) and
says which it took (:class:`~tpm_fed.protocol.back_channel.Received`, every
:data:`ACK_EVERY`). A :class:`Link` is one socket: its writer sends the frames
the worker lacks, in order, after the :class:`~tpm_fed.protocol.back_channel.Welcome`.
A new socket of the same task replaces the last (:meth:`Session.attach`),
which may be half-open: a WAN link that dropped without either end seeing it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from tpm_fed.engine.pending import Pending
from tpm_fed.protocol.back_channel import (
    Cancelled,
    Joined,
    JoinsEnded,
    Received,
    Settled,
    Welcome,
)
from tpm_fed.protocol.errors import InvalidRequest

ACK_EVERY = 16
"""The service says which worker frames it took once per this many: the worker keeps each frame until then,
to send it again after a drop."""

Frame = Joined | Cancelled | Settled | JoinsEnded
"""What the service pushes down a channel (numbered, kept until the worker has it)."""


class Joins(Protocol):
    """A running task's dispatcher, for the requests that join the task and their answers."""

    async def take(self, wait_s: float) -> list[Pending] | None:
        """Requests that may join the task now, unreserved (``[]``: none came within ``wait_s``; None: no
        more may join). Waits on the event loop, holding no thread."""
        ...

    async def reserve(self, taken: list[Pending]) -> tuple[list[dict[str, Any]], bool]:
        """Reserve what :meth:`take` took: their wire forms, and whether the task still runs."""
        ...

    def reserve_now(self) -> list[dict[str, Any]] | None:
        """On the event loop, in a route's pass: the interactive requests waiting, taken and reserved now (their
        wire forms), or None (none, or the ledger would have had to wait: :meth:`take` has them)."""
        ...

    def hands_now(self, hand: Any) -> None:
        """Routes that queue an interactive request call ``hand()`` (True: it was handed over) from now on;
        None: no more."""
        ...

    def stop_joining(self) -> None:
        """The worker takes no more (its engine ran dry); a waiting :meth:`take` returns now."""
        ...

    def reopen_joining(self) -> None:
        """The worker takes requests again after it stopped (some came as it stopped, so it runs on)."""
        ...

    def answered(self, served: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
        """Outcomes of the task's requests that finished before it did, by request id."""
        ...


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@dataclass
class Session:
    """One running task's channel, whatever socket carries it now. The hub's fields (``requests`` to
    ``settled``) are read and written under the hub's lock; the channel's own under :attr:`lock`."""

    requests: set[str]  # this task's requests: what its secret may feed and answer
    joins: Joins | None = None
    own: frozenset[str] = frozenset()  # sent with it: few, and its worker keeps their answers (functions.isolation)
    settled: list[str] = field(default_factory=list)  # joined requests' early answers settled, not yet told
    resume: str | None = None  # made when its first socket opens: a later socket must say it
    joiner: asyncio.Task | None = None  # pushes joining requests (tpm_fed.service.routes_channel); outlives sockets
    link: Link | None = None  # the socket carrying it now
    ended: bool = False
    outbox: deque[tuple[int, str]] = field(default_factory=deque)  # pushed frames the worker has not acknowledged
    pushed: int = 0  # the last frame's number
    received: int = 0  # the last worker frame taken
    told: int = 0  # the last worker frame acknowledged to it
    lock: threading.Lock = field(default_factory=threading.Lock)

    def push(self, frame: Frame) -> None:
        """From any thread: number ``frame`` and keep it until the worker has it."""
        with self.lock:
            if self.ended:
                return
            self.pushed += 1
            self.outbox.append((self.pushed, frame.model_copy(update={"seq": self.pushed}).to_frame()))
            link = self.link
        if link is not None:
            link.poke()

    def take(self, seq: int | None, ack: int) -> bool:
        """For each worker frame: whether it is new (one sent again after a drop that came before is not);
        notes what the worker acknowledged.

        Raises:
            InvalidRequest: A frame is missing before this one (the worker sends it again on a new socket), or
                the worker acknowledges frames never sent.
        """
        with self.lock:
            self._acknowledged(ack)
            if seq is None:  # not numbered: taken as it comes
                return True
            if seq <= self.received:
                return False
            if seq != self.received + 1:
                raise InvalidRequest(f"worker frame {self.received + 1} is missing")
            self.received = seq
            link = self.link if seq - self.told >= ACK_EVERY else None
        if link is not None:
            link.poke()
        return True

    def attach(self, token: str, received: int) -> Link:
        """On the event loop: a new socket carries the channel from now on, its worker having taken the frames
        up to ``received``; the last socket closes."""
        with self.lock:
            self._acknowledged(received)
            assert self.resume is not None
            link = Link(token, self, Welcome(resume=self.resume, received=self.received), received)
            old, self.link = self.link, link
            if old is not None:
                old.replaced = True
        if old is not None:
            old.poke()  # its writer closes it
        return link

    def detach(self, link: Link) -> bool:
        """``link``'s socket closed: whether it was the one carrying the channel."""
        with self.lock:
            if self.link is not link:
                return False
            self.link = None
            return True

    def end(self) -> None:
        """The task ended: the socket closes once what is queued is sent, and the joiner stops."""
        with self.lock:
            self.ended = True
            link, joiner = self.link, self.joiner
        if link is not None:
            link.poke()
        if joiner is not None:  # it would push to no one
            try:
                joiner.get_loop().call_soon_threadsafe(joiner.cancel)
            except RuntimeError:  # the loop closed
                pass

    def _acknowledged(self, seq: int) -> None:
        """Under the lock: the worker has the frames up to ``seq``."""
        if seq > self.pushed:
            raise InvalidRequest("the worker acknowledges frames that were never sent")
        while self.outbox and self.outbox[0][0] <= seq:
            self.outbox.popleft()


class Link:
    """One socket of a task's channel (made on its event loop)."""

    def __init__(self, token: str, session: Session, welcome: Welcome, written: int) -> None:
        self.token, self.session, self.joins = token, session, session.joins
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.written = written  # the last numbered frame sent on this socket (or that the worker had)
        self.replaced = False  # a newer socket carries the channel: this one closes
        self.socket: Any = None  # the route's WebSocket (routes_channel writes to it)
        self.writing: asyncio.Future | None = None  # a send to the socket in progress: the next waits for it
        self._welcome: Welcome | None = welcome
        self.wake.set()

    @property
    def current(self) -> bool:
        """Whether this socket still carries its channel (not replaced, its task running)."""
        return not self.replaced and not self.session.ended

    def push(self, frame: Frame) -> None:
        """From any thread: numbered and kept until the worker has it (sent on whichever socket carries it)."""
        self.session.push(frame)

    def poke(self) -> None:
        """From any thread: the writer has something to do."""
        if running_loop() is self.loop:
            self.wake.set()
        else:
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:  # the loop closed: so did the socket
                pass

    def due(self) -> tuple[list[str], bool]:
        """On the loop, for the socket's writer: the frames to send now, and whether it closes after them."""
        session, texts = self.session, []
        with session.lock:
            if self._welcome is not None:
                texts.append(self._welcome.to_frame())
                self._welcome = None
            if session.received - session.told >= ACK_EVERY or (session.ended and session.received > session.told):
                session.told = session.received
                texts.append(Received(seq=session.received).to_frame())
            for seq, text in session.outbox:
                if seq > self.written:
                    texts.append(text)
                    self.written = seq
            return texts, self.replaced or session.ended
