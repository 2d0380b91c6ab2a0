"""Open admission asks do not delay new submissions.

A running vLLM task keeps an ask for more requests open on the back channel
(``POST /tpm/v1/stream/admit``, held up to ``wait_s``). Were each held ask a
thread of the pool the routes also submit through (anyio's, 40 threads), 64
running tasks would leave no thread for a new request: it would wait for an
ask to end. Here 64 tasks (real dispatchers on a fake site, the service's real
hub and route) each keep an ask open, as their workers do, while new requests
are submitted to the service's own torch replica: their median latency stays
within twice the idle median.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future

import httpx

from tests.test_dispatch import VLLM_SPEC, reply_for, request
from tpm_fed.engine.dispatcher import ReplicaDispatcher
from tpm_fed.home import DEMO_MODEL_NAME
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


ASKERS = """
import http.client, json, sys, threading, time, urllib.parse
url, tokens = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2:]
held, stop = [], threading.Event()

def ask(token, delay):  # as functions.admission asks: one kept-alive connection, wait_s 1
    time.sleep(delay)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = json.dumps({"token": token, "wait_s": 1.0})
    while not stop.is_set():
        started = time.perf_counter()
        connection.request("POST", url.path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read()) == {"requests": [], "open": True}
        held.append(time.perf_counter() - started)

for i, token in enumerate(tokens):
    threading.Thread(target=ask, args=(token, i / len(tokens)), daemon=True).start()
try:
    while True:
        time.sleep(0.1)
except KeyboardInterrupt:
    stop.set()
print(json.dumps(held))
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


def test_64_open_admission_asks_leave_submissions_undelayed(runtime, service):
    _latencies(service.url, service.headers)  # the replica is warm before anything is timed
    idle = _latencies(service.url, service.headers)

    hub = runtime.channels
    sites = [StreamingSite() for _ in range(TASKS)]
    dispatchers = [ReplicaDispatcher(site, VLLM_SPEC, max_batch=8, max_in_flight=1, channels=hub)
                   for site in sites]
    for dispatcher in dispatchers:
        dispatcher.submit(request("running"))
    tokens = [site.tasks[0][2]["stream"]["token"] for site in sites]

    # The asks come from another process, as workers' do (threads of this one would share its GIL with
    # the service), each started at its own moment within a second, as independent tasks are.
    askers = subprocess.Popen([sys.executable, "-c", ASKERS, f"{service.url}/tpm/v1/stream/admit", *tokens],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # every ask open (they start over 1 s, in a process that starts first), held 1 s, asked again
        busy = _latencies(service.url, service.headers)
    finally:
        askers.send_signal(signal.SIGINT)
        report, _ = askers.communicate(timeout=30)
        for site in sites:
            future, requests, _ = site.tasks[0]
            future.set_result(reply_for(requests))

    held = json.loads(report.strip().splitlines()[-1])
    assert len(held) >= TASKS and statistics.median(held) > 0.5, f"the asks were not held open: {held}"
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(f"submit p50 idle {idle_p50 * 1000:.1f} ms, with {TASKS} open asks {busy_p50 * 1000:.1f} ms")
    assert busy_p50 <= 2 * idle_p50, (
        f"submissions waited behind the open asks: p50 {busy_p50 * 1000:.1f} ms vs {idle_p50 * 1000:.1f} ms idle")
