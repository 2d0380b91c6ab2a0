"""Request bodies the service takes: at most so big, and arriving at a reasonable pace.

A pure ASGI middleware, so a body over the limit is refused from its
``Content-Length`` before a byte of it is read (or, sent chunked, as soon as
it passes the limit), and a client that stops sending its body mid-way, or
trickles it a byte at a time, is answered 408 instead of holding a connection
and a worker thread forever.

The clock runs only while the body arrives. Once its last piece is in
(``more_body`` false), what the app reads next is the client leaving, which
may come hours later: a long event stream or download listens for it the
whole time (Starlette's disconnect listener), so timing it would cut every
answer that outlasts the timeout.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tpm_fed.protocol.limits import MAX_PAYLOAD_BYTES

MAX_BODY_BYTES = MAX_PAYLOAD_BYTES
"""A request must fit in one Globus Compute task; a bigger body could never run."""

BODY_TIMEOUT_S = 30.0
"""Most seconds between two pieces of a request body."""

BODY_DEADLINE_S = 300.0
"""Most seconds for a whole request body (a 100 MiB batch file at 1 MiB/s fits): a client sending a
byte just inside every stall timeout is cut here."""


class BodyLimits:
    """Refuse bodies over ``max_bytes`` (413), and bodies that stall for ``timeout_s`` or are not all in
    ``deadline_s`` after the app first reads them (408)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S,
                 larger: dict[str, int] | None = None, deadline_s: float = BODY_DEADLINE_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.larger = larger or {}
        """Paths whose bodies may be bigger (a batch file upload), with their own limits."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.larger.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await _answer(send, 413, f"the request body is {int(declared):,} bytes; the most is {max_bytes:,}")
            return
        received = 0
        started = answered = body_ended = False
        deadline: float | None = None

        async def refuse(status: int, message: str) -> dict:
            """Answer for the app (once, if it has not begun its own answer), and tell it the client left."""
            nonlocal answered
            if not started and not answered:
                answered = True
                await _answer(send, status, message)
            return {"type": "http.disconnect"}

        async def limited_receive() -> dict:
            nonlocal received, body_ended, deadline
            if body_ended:  # what comes now is the client leaving, whenever it does: not timed
                return await receive()
            now = asyncio.get_running_loop().time()
            deadline = deadline if deadline is not None else now + self.deadline_s
            wait = min(self.timeout_s, deadline - now)
            try:  # a timer on this task (asyncio.wait_for would start a task and a timer per receive)
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                if wait < self.timeout_s:
                    return await refuse(408, f"the request body took more than {self.deadline_s:g} s")
                return await refuse(408, f"the request body stalled for {self.timeout_s:g} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    return await refuse(413, f"the request body passed {max_bytes:,} bytes")
                body_ended = not message.get("more_body", False)
            else:  # http.disconnect: nothing more will come
                body_ended = True
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            if answered:  # the refusal above is the answer; the app's own is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, watched_send)


async def _answer(send: Any, status: int, message: str) -> None:
    kind = "request_timeout" if status == 408 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": "PayloadTooLarge" if status == 413 else "RequestTimeout"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
