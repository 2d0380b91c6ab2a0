"""Defect 9: a slow client cannot hold connections open forever.

500 connections that sent half a request head stayed open past 60 s, and a
body sent a byte every 20 s (inside the per-piece stall timeout) was never
timed out. Now a request head must be complete ``header_timeout_s`` after
its first byte, a whole body must arrive within ``body_deadline_s``, and
past ``max_connections`` open connections a request is answered 503. The
deadlines are set small here; ``tpm serve`` takes them from its environment
(docs/service.md).
"""

from __future__ import annotations

import secrets
import select
import socket
import time

import httpx
import pytest

from tests.service_helpers import ServiceThread
from tpm_fed.service.connections import ConnectionLimits

LIMITS = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, body_deadline_s=2.0, max_connections=6)


@pytest.fixture(scope="module")
def guarded(assembly, runtime):
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    app = build_app(assembly, LocalToken(token, runtime.owner))
    app.timeout_s, app.deadline_s = LIMITS.body_timeout_s, LIMITS.body_deadline_s  # as tpm serve sets them
    with ServiceThread(app, LIMITS) as url:
        yield url, token


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))


def closed_within(connection: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it was still open after ``seconds``."""
    connection.settimeout(seconds)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_a_half_sent_request_head_is_closed_at_the_header_deadline(guarded):
    url, _ = guarded
    started = time.monotonic()
    with connect(url) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {url[7:]}\r\nContent-Type: appl".encode())
        assert closed_within(connection, LIMITS.header_timeout_s + 3) is not None
    assert time.monotonic() - started < LIMITS.header_timeout_s + 3


def test_a_silent_connection_is_closed_at_the_header_deadline(guarded):
    url, _ = guarded
    with connect(url) as connection:
        assert closed_within(connection, LIMITS.header_timeout_s + 3) == b""


def test_a_body_trickled_inside_the_stall_timeout_is_cut_at_the_body_deadline(guarded):
    url, token = guarded
    started = time.monotonic()
    with connect(url) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {url[7:]}\r\nAuthorization: Bearer {token}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
        reply = b""
        for _ in range(40):  # a byte every 0.3 s: never a stall, 12 s in all if nobody stops it
            connection.sendall(b" ")
            if select.select([connection], [], [], 0.3)[0]:
                reply = closed_within(connection, 5) or b""
                break
    took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), (took, reply[:200])
    assert b"took more than" in reply and took < LIMITS.body_deadline_s + 2


def test_past_the_connection_cap_requests_are_refused_until_slow_ones_are_closed(guarded):
    url, token = guarded
    holders = [connect(url) for _ in range(LIMITS.max_connections)]
    try:
        for holder in holders:
            holder.sendall(b"GET /health HTTP/1.1\r\n")  # half a head each
        time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # the cap holds
        time.sleep(LIMITS.header_timeout_s + 0.5)  # the slow ones are closed at their deadline
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        for holder in holders:
            holder.close()
