"""Defect 6: an answer that takes longer than the body timeout is not cut.

The body timeout timed every ``receive()``, also after the body had ended;
Starlette's disconnect listener (which every event stream and download runs
while it sends) then heard ``http.disconnect`` after 30 s, and the answer
was cut mid-way while the caller was charged for all of it. The timeout is
set to 1 s here and answers are made to last several times that: a slow
link between the service and its caller delays each piece of the answer.
A body that really stalls is still answered 408.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from typing import Any

import httpx
import pytest

from tests.batch_helpers import jsonl, read_jsonl, wait_for
from tests.service_helpers import ServiceThread, openai_client

BODY_TIMEOUT_S = 1.0
PIECE_DELAY_S = 1.2
"""Each piece of an answer reaches the caller this much later: any answer has at least two pieces (an
event stream its text and ``[DONE]``), so it outlasts the timeout twice over however its text is merged."""


class SlowLink:
    """An ASGI wrapper that delays every piece of every answer by ``PIECE_DELAY_S``, as a slow network does."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def slow_send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                await asyncio.sleep(PIECE_DELAY_S)
            await send(message)

        await self.app(scope, receive, slow_send)


@pytest.fixture(scope="module")
def slow_service(assembly, runtime):
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    app = build_app(assembly, LocalToken(token, runtime.owner))
    app.timeout_s = BODY_TIMEOUT_S  # its BodyLimits: the stall timeout, short
    with ServiceThread(SlowLink(app)) as url:
        yield url, token


def test_an_event_stream_longer_than_the_body_timeout_is_not_cut(slow_service, runtime):
    url, token = slow_service
    body = {"model": "demo-llama", "prompt": "The river carries", "max_tokens": 24, "min_tokens": 24,
            "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"},
                       timeout=120).json()["choices"][0]["text"]
    started, lines = time.monotonic(), []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as answer:
            lines.extend(line for line in answer.iter_lines() if line.startswith("data: "))
    except httpx.RemoteProtocolError:  # a stream cut mid-way
        pass
    took = time.monotonic() - started
    assert lines and lines[-1] == "data: [DONE]", f"cut after {took:.1f} s: {lines[-2:]}"
    assert took > 2 * BODY_TIMEOUT_S  # it really outlasted the timeout
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole


def test_a_batch_results_download_longer_than_the_body_timeout_is_not_cut(slow_service):
    url, token = slow_service
    client = openai_client(url, token)
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "demo-llama", "prompt": f"The cell {i}", "max_tokens": 2, "temperature": 0}}
             for i in range(10)]
    uploaded = client.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert wait_for(client, batch.id).status == "completed"
    started = time.monotonic()
    try:
        answer = httpx.get(f"{url}/tpm/v1/batches/{batch.id}/results", headers={"Authorization": f"Bearer {token}"},
                           timeout=120)
        results = read_jsonl(answer.content)
    except httpx.RemoteProtocolError as error:  # a download cut mid-way
        results = [str(error)]
    took = time.monotonic() - started
    assert [line["custom_id"] for line in results] == [line["custom_id"] for line in lines], f"after {took:.1f} s"
    assert took > 2 * BODY_TIMEOUT_S  # it really outlasted the timeout


def test_a_body_that_stalls_is_still_answered_408(slow_service):
    url, token = slow_service
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":".encode())
        connection.settimeout(10)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3 * PIECE_DELAY_S + 2
