"""The worker's end of the back channel: a running task posts streamed text and early answers to the service.

The endpoint engine returns a task's result only when the task ends, so a
streamed request's text travels another way: the service names, in the
task's context, a URL and a secret token made for this one task
(:class:`~tpm_fed.protocol.back_channel.ChannelAddress`); the worker POSTs
what each streamed request has produced so far as a
:class:`~tpm_fed.protocol.back_channel.ChannelPost` (per prompt, the new text
since that prompt's last chunk). The bodies both ways are the contract's
models (:mod:`tpm_fed.protocol.back_channel`), read by the service as built here.

- Sending barely slows generation: a background thread sends whatever has
  piled up, merged per prompt, at most one POST every ``SEND_INTERVAL_S``,
  on one kept-alive connection; only a prompt's first text leaves at once.
- Where the service cannot be reached (no route back from a remote
  endpoint, or a host this endpoint's policy does not list), streaming is
  off for the task and the final result carries everything, as before.
- The final result stays the authority: the service sends whatever the
  chunks did not cover when the task ends, so the stream always adds up to
  the completion.
- The service's answer to a post names the requests whose callers left
  (``cancelled``): the backend stops generating for them, their batch-mates
  go on, and they are charged for the tokens made until then.
- A request that finishes before its batch does is *answered* on the channel
  at once (``outcomes``, with the replica's ``served`` facts), so its caller
  need not wait for the slowest batch-mate; the task's result still carries
  every answer, and the service settles each request once, whichever comes
  first. Requests that joined the running task (:mod:`functions.joining`)
  are answered this way too.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from functions.policy import WorkerPolicy
from tpm_fed.protocol.back_channel import ChannelAddress, ChannelPost, ChannelPostAnswer, EarlyAnswer
from tpm_fed.protocol.task_reply import Outcome, ServedBy


SEND_INTERVAL_S = 0.02
"""Shortest time between two posts of one task (text piles up meanwhile, merged per prompt)."""


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


class BackChannel:
    """Sends chunks to the service from a background thread; gives up for good on the first failure.

    Args:
        url: The service's back-channel route (``.../tpm/v1/stream``).
        token: The task's secret, checked by the service.
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = urlsplit(url)
        self.token = token
        self.delivered = False
        self.failed: str | None = None
        self.cancelled: set[str] = set()  # requests whose callers left: stop generating for them
        self.served: ServedBy | None = None  # the replica's facts, sent with answers (set by serve_batch)
        self.answers: dict[str, dict[str, Any]] = {}  # every request answered here, by id
        self._pending: list[dict[str, Any]] = []
        self._outcomes: list[EarlyAnswer] = []
        self._begun: set[tuple[str, int]] = set()  # (request, prompt) pairs that sent text already
        self._urgent = False
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tpm-stream", daemon=True)
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
                self._pending.extend(chunks)
                for chunk in chunks:  # a prompt's first text leaves at once: it is its caller's first token
                    key = (chunk["request_id"], chunk["index"])
                    if key not in self._begun:
                        self._begun.add(key)
                        self._urgent = True
                self._wake.notify()

    @property
    def join_url(self) -> str:
        """Where the worker asks for requests that may join its running task (the route keeps its wire name, ``.../admit``)."""
        return self.url._replace(path=self.url.path.rstrip("/") + "/admit").geturl()

    def answer(self, request_id: str, outcome: dict[str, Any], run_s: float) -> None:
        """Send one request's outcome now (it finished before its task); kept for the task's result too."""
        timed = {**outcome, "run_s": run_s}
        self.answers[request_id] = timed
        if self.failed is None:
            with self._wake:
                self._outcomes.append(EarlyAnswer(request_id=request_id, outcome=Outcome.model_validate(timed)))
                self._wake.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then stop (before the task's result leaves, so chunks come first)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        connection = None
        posted_at = float("-inf")
        while True:
            with self._wake:
                while not self._pending and not self._outcomes and not self._closing:
                    self._wake.wait()
                # At most one post per SEND_INTERVAL_S: a step takes milliseconds, and a post per step
                # per batch costs the generating process more than the caller gains. A first token
                # does not wait: time to first token is what a streaming caller feels most.
                while not self._closing and not self._urgent \
                        and (wait := posted_at + SEND_INTERVAL_S - time.monotonic()) > 0:
                    self._wake.wait(wait)
                self._urgent = False
                batch, self._pending = self._pending, []
                outcomes, self._outcomes = self._outcomes, []
                closing = self._closing
            if (batch or outcomes) and self.failed is None:
                try:
                    connection = connection or self._connect()
                    self._post(connection, merged(batch), outcomes)
                    posted_at = time.monotonic()
                    self.delivered = True
                except (OSError, http.client.HTTPException, ValueError) as error:
                    self.failed = f"{type(error).__name__}: {error}"
                    connection = None
            if closing:
                break
        if connection is not None:
            connection.close()

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        return kind(self.url.hostname, self.url.port, timeout=10)

    def _post(self, connection: http.client.HTTPConnection, chunks: list[dict[str, Any]],
              outcomes: list[EarlyAnswer]) -> None:
        # Chunks first: a request's text reaches its caller before its end does.
        message = ChannelPost(token=self.token, chunks=chunks, outcomes=outcomes,
                              served=self.served if outcomes else None)
        body = json.dumps(message.to_wire()).encode()
        connection.request("POST", self.url.path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        reply = answer.read()
        if answer.status != 200:
            raise ValueError(f"the service answered {answer.status}")
        self.cancelled.update(ChannelPostAnswer.model_validate_json(reply).cancelled)  # ValidationError: a ValueError
