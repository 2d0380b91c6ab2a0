"""Open channels of running tasks do not delay new submissions.

A running vLLM task keeps its channel open (``/tpm/v1/channel``, a WebSocket),
and the service keeps a take for more requests open for it. Were each held
take a thread of the pool the routes also submit through (anyio's, 40
threads), 64 running tasks would leave no thread for a new request. Here 64
tasks (real dispatchers on a fake site, the service's real hub and route) each
hold their channel open to joining, as their workers do, while new requests
are submitted to the service's own torch replica: their median latency stays
within twice the idle median.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import httpx

from functions.back_channel import socket_url
from tests.test_dispatch import VLLM_SPEC, reply_for, request
from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.back_channel import CHANNEL_ROUTE
from tpm_fed.sites.base import SiteStatus

TASKS = 64
SAMPLES = 9
BODY = {"model": DEMO_MODEL_NAME, "prompt": "The telescope", "max_tokens": 1, "temperature": 0}


class StreamingSite:
    """A site whose tasks run until the test ends them; keeps each task's back channel."""

    name = "held"

    def __init__(self) -> None:
        self.tasks: list[tuple[Future, list[dict], dict]] = []

    def submit(self, function, model, requests, context):
        future: Future = Future()
        self.tasks.append((future, requests, context))
        return future

    def status(self) -> SiteStatus:
        return SiteStatus(self.name, "test", "running", 1, len(self.tasks))

    def shutdown(self) -> None:
        pass


CHANNELS = """
import json, signal, sys, threading, time
stop = threading.Event()
signal.signal(signal.SIGINT, lambda *_: stop.set())  # whenever it comes, the sockets close and the report is printed
from websockets.sync.client import connect
url, tokens = sys.argv[1], sys.argv[2:]
frames, opened = [], []

def hold(token, delay):  # as functions.back_channel does: hello, then open to joining, then wait for pushes
    time.sleep(delay)
    with connect(url, compression=None) as socket:
        socket.send(json.dumps({"type": "hello", "token": token}))
        socket.send(json.dumps({"type": "open_to_join"}))
        opened.append(token)
        print("open", flush=True)  # the test times submissions once every channel is open
        while not stop.is_set():
            try:
                frame = socket.recv(timeout=0.2)
            except TimeoutError:
                continue
            if json.loads(frame)["type"] != "welcome":  # each socket's first frame (its resume key): not a push
                frames.append(frame)

holders = [threading.Thread(target=hold, args=(token, i / len(tokens)), daemon=True) for i, token in enumerate(tokens)]
for holder in holders:
    holder.start()
while not stop.is_set():
    time.sleep(0.1)
deadline = time.monotonic() + 5  # each sees the stop within 0.2 s; 5 s for them all
for holder in holders:
    holder.join(timeout=max(0.0, deadline - time.monotonic()))
print(json.dumps({"opened": len(opened), "frames": frames}))
"""


def _latencies(url: str, headers: dict) -> list[float]:
    took = []
    with httpx.Client(timeout=60) as client:
        for _ in range(SAMPLES):
            started = time.perf_counter()
            answer = client.post(f"{url}/v1/completions", json=BODY, headers=headers)
            took.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
    return took


def test_64_open_channels_leave_submissions_undelayed(runtime, service):
    _latencies(service.url, service.headers)  # the replica is warm before anything is timed
    idle = _latencies(service.url, service.headers)

    hub = runtime.channels
    sites = [StreamingSite() for _ in range(TASKS)]
    dispatchers = [ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub)
                   for site in sites]
    for dispatcher in dispatchers:
        dispatcher.submit(request("running"))
    tokens = [site.tasks[0][2]["stream"]["token"] for site in sites]

    # The channels come from another process, as workers' do (threads of this one would share its GIL with
    # the service), each opened at its own moment within a second, as independent tasks are.
    holders = subprocess.Popen([sys.executable, "-c", CHANNELS, socket_url(service.url + CHANNEL_ROUTE), *tokens],
                               stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, holders.kill)  # a holder that never opens fails the test, not hangs it
    watchdog.start()
    try:
        # Every channel open (over 1 s, in a process that may start slowly on a busy machine), its take renewed.
        opened = sum(1 for _, line in zip(range(TASKS), holders.stdout, strict=False) if line.strip() == "open")
        assert opened == TASKS, f"only {opened} of {TASKS} channels opened"
        time.sleep(1.0)
        busy = _latencies(service.url, service.headers)
    finally:
        holders.send_signal(signal.SIGINT)
        report, _ = holders.communicate(timeout=30)
        watchdog.cancel()
        for site in sites:
            future, requests, _ = site.tasks[0]
            future.set_result(reply_for(requests))

    held = json.loads(report.strip().splitlines()[-1])
    assert held == {"opened": TASKS, "frames": []}, f"the channels were not held open: {held}"
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(f"submit p50 idle {idle_p50 * 1000:.1f} ms, with {TASKS} open channels {busy_p50 * 1000:.1f} ms")
    assert busy_p50 <= 2 * idle_p50, (
        f"submissions waited behind the open channels: p50 {busy_p50 * 1000:.1f} ms vs {idle_p50 * 1000:.1f} ms idle")
