"""Where one streamed request's first-token time goes in the service, stage by stage.

``tpm serve`` (one local site, the demo model on vLLM) runs in its own process
with probes wrapped around the functions each stage ends in; the client sends
streamed ``/v1/completions`` one at a time (after a warm-up that starts the
replica and its long-lived task), and each request's stamps are read back:

1. client sends -> the route starts it (``service.serving.start``: HTTP, auth, body limits, parsing);
2. -> placed and queued (``Engine.submit_async`` returned: edge checks, catalog, placement);
3. -> taken from the queue by the running task's channel (``Joining.take``);
4. -> reserved (``Joining.reserve``: the ledger's reservation, off the loop);
5. -> pushed on the task's channel (``Link.push`` of the ``joined`` frame);
6. -> its first chunk back from the worker (``ChunkQueue.put``: the worker's engine step and the socket);
7. -> its first SSE event handed to the HTTP server (``live_events``' first yield);
8. -> the client reads its first event.

Stamps are wall-clock (``time.time``) in both processes, on one machine. The
probes cost a few microseconds each. Prints the mean, median and p90 of each stage.

With ``--batch LINES`` a batch of that many completions runs through the
batch API first, and the requests are sent one at a time, ``--every``
seconds apart, while it runs (as ``bench_batch_priority.py`` times them;
``--batch-rows CAP:K:T`` shares the engine as its option does): which stage
grows beside a batch.

Usage:
    python scripts/service_stages.py [--demo-dir DIR] [--requests 40] [--max-tokens 1]
        [--batch 512 [--batch-rows 16:0] [--every 0.25]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUSY_TOKENS = 200
_clients = threading.local()
STAGES = ["sent", "route", "placed", "taken", "reserved", "pushed", "chunk", "sse", "read"]


def probed_service(stamps_file: str, home: str) -> None:
    """Run ``tpm serve`` in this process with the stage probes in place (the child's entry point)."""
    import asyncio
    import runpy

    from tpm_fed.engine import joining
    from tpm_fed.service import back_channel_hub, serving, streaming

    out = open(stamps_file, "a", buffering=1)  # noqa: SIM115 - written until the process ends
    stamps: dict[str, dict[str, float]] = {}
    by_queue: dict[int, str] = {}

    def stamp(request_id: str, stage: str) -> None:
        stamps.setdefault(request_id, {}).setdefault(stage, time.time())

    start = serving.start
    watching: list[asyncio.Task] = []

    async def watch_loop() -> None:
        """The event loop's lag: how late a 5 ms sleep wakes (every hop on the loop waits about that)."""
        lags = []
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append([time.time(), time.perf_counter() - before - 0.005])
            if len(lags) >= 100:
                out.write(json.dumps({"lag": lags}) + "\n")
                lags = []

    async def probed_start(runtime, request, identity, observer=None):
        if not watching:
            watching.append(asyncio.ensure_future(watch_loop()))
        stamp(request.request_id, "route")
        stamps[request.request_id]["tokens"] = request.max_new_tokens
        try:
            return await start(runtime, request, identity, observer)
        finally:
            stamp(request.request_id, "placed")

    serving.start = probed_start

    take, reserve = joining.Joining.take, joining.Joining.reserve

    async def probed_take(self, task, wait_s):
        taken = await take(self, task, wait_s)
        for pending in taken or []:
            stamp(pending.request_id, "taken")
        return taken

    async def probed_reserve(self, task, taken):
        answer = await reserve(self, task, taken)
        for pending in taken:
            stamp(pending.request_id, "reserved")
        return answer

    joining.Joining.take, joining.Joining.reserve = probed_take, probed_reserve

    push = back_channel_hub.Link.push

    def probed_push(self, frame):
        for request in getattr(frame, "requests", None) or []:
            request_id = request.get("request_id") if isinstance(request, dict) else None
            if request_id:
                stamp(request_id, "pushed")
        push(self, frame)

    back_channel_hub.Link.push = probed_push

    queue_for, put = back_channel_hub.BackChannelHub.queue_for, back_channel_hub.ChunkQueue.put

    def probed_queue_for(self, request_id):
        queue = queue_for(self, request_id)
        by_queue[id(queue)] = request_id
        return queue

    def probed_put(self, chunk):
        if id(self) in by_queue:
            stamp(by_queue[id(self)], "chunk")
        put(self, chunk)

    back_channel_hub.BackChannelHub.queue_for, back_channel_hub.ChunkQueue.put = probed_queue_for, probed_put

    live_events = streaming.live_events

    async def probed_live_events(queue, *args):
        request_id = by_queue.get(id(queue), "")
        first = True
        async for data in live_events(queue, *args):
            if first:
                first = False
                stamp(request_id, "sse")
                out.write(json.dumps({"request_id": request_id, **stamps.pop(request_id, {})}) + "\n")
            yield data

    streaming.live_events = probed_live_events
    sys.argv = ["tpm_fed.service", "--home", home]
    runpy.run_module("tpm_fed.service", run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=None, help="a trained demo model folder to copy")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1,
                        help="clients sending at once, each its requests back to back (as vLLM's client)")
    parser.add_argument("--busy", action="store_true",
                        help="keep a long stream running beside them, so each joins the running task")
    parser.add_argument("--batch", type=int, default=0,
                        help="time the requests while a batch of this many lines runs (one at a time, --every apart)")
    parser.add_argument("--batch-rows", default="none",
                        help="with --batch: the site's CAP[:K] on batch rows (as bench_batch_priority.py's option)")
    parser.add_argument("--every", type=float, default=0.25, help="with --batch: seconds between requests")
    parser.add_argument("--serve-probed", nargs=2, metavar=("STAMPS", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_probed:
        probed_service(*args.serve_probed)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from bench_service import bench_home
    from benchlib import demo_model, log, machine, share_engine, share_of

    scratch = Path(tempfile.mkdtemp(prefix="tpm-service-stages-"))
    started_on = machine()
    try:
        home = bench_home(scratch / "home", demo_model(scratch / "demo", args.demo_dir), "vllm")
        if args.batch:
            share_engine(home, share_of(args.batch_rows))
        stamps_file = scratch / "stamps.jsonl"
        with probed_serve(home, stamps_file) as (url, headers):
            log("warm-up (starts the replica and its task)")
            for _ in range(3):
                one_request(url, headers, args.max_tokens)
            busy = _keep_busy(url, headers) if args.busy else None
            time.sleep(1.0 if busy else 0.0)
            stamps_file.write_text("")
            log(f"{args.requests} streamed requests, {args.streams} at a time")
            if args.batch:
                client = _beside_batch(url, headers, args)
            elif args.streams > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(args.streams) as streams:
                    client = list(streams.map(lambda _: one_request(url, headers, args.max_tokens),
                                              range(args.requests)))
            else:
                client = [one_request(url, headers, args.max_tokens) for _ in range(args.requests)]
            time.sleep(0.5)
            if busy is not None:
                busy.set()
        measured = served_stamps(stamps_file)
        served = [row for row in measured if row.get("tokens") == args.max_tokens]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    theirs = {row["request_id"]: row for row in served}
    rows = [{**theirs[mine["request_id"]], **mine} for mine in client if mine["request_id"] in theirs]
    print(f"started {started_on}; ended {machine()}")
    own_task = [row for row in rows if "taken" not in row]
    print(f"{len(own_task)} of {len(rows)} started a task of their own (did not join a running one)")
    print(f"{len(rows)} of {args.requests} requests stamped ({args.streams} at a time, max_tokens {args.max_tokens}"
          f"{', beside a long stream that keeps the task running' if args.busy else ''}); ms:")
    spans: dict[str, list[float]] = {}
    for row in rows:  # consecutive stamps: a request that started its own task has no take, reserve or push
        present = [stage for stage in STAGES if row.get(stage) is not None]
        for before, after in itertools.pairwise(present):
            spans.setdefault(f"{before} -> {after}", []).append(1000 * (row[after] - row[before]))
        if "sent" in present and "read" in present:
            how = "joined a running task" if "taken" in row else "started its own task"
            spans.setdefault(f"whole (sent -> read), {how}", []).append(1000 * (row["read"] - row["sent"]))
    sent, read = [row["sent"] for row in rows if row.get("sent")], [row["read"] for row in rows if row.get("read")]
    lags = sorted(1000 * lag for row in measured for at, lag in row.get("lag", ())
                  if sent and read and min(sent) <= at <= max(read))
    if lags:
        print(f"the service's event loop while they ran: a 5 ms sleep woke late by {statistics.fmean(lags):.2f} ms "
              f"on average (median {statistics.median(lags):.2f}, p90 {lags[int(0.9 * (len(lags) - 1))]:.2f}, "
              f"{len(lags)} sleeps)")
    print("| stage | requests | mean | median | p90 |")
    print("|---|---|---|---|---|")
    for label, values in spans.items():
        values.sort()
        print(f"| {label} | {len(values)} | {statistics.fmean(values):.2f} | {statistics.median(values):.2f} | "
              f"{values[int(0.9 * (len(values) - 1))]:.2f} |")


def _beside_batch(url: str, headers: dict, args) -> list[dict]:
    """Submit a batch of ``args.batch`` lines, then send the requests one at a time while it runs."""
    from bench_quotes import batch_file

    from tpm_fed.client import Client

    client = Client(url, headers["Authorization"].split()[1])
    try:
        batch = client.batches.submit(batch_file(args.batch, [32]))
        while client.batches.retrieve(batch["id"])["status"] != "in_progress":
            time.sleep(0.05)
        stamped = []
        while len(stamped) < args.requests and client.batches.retrieve(batch["id"])["status"] == "in_progress":
            stamped.append(one_request(url, headers, args.max_tokens))
            time.sleep(args.every)
        if len(stamped) < args.requests:
            print(f"the batch ended after {len(stamped)} of {args.requests} requests: give more --batch lines")
        client.batches.wait(batch["id"])
        return stamped
    finally:
        client.close()


def served_stamps(stamps_file: Path) -> list[dict]:
    return [json.loads(line) for line in stamps_file.read_text().splitlines() if line.strip()]


def _keep_busy(url: str, headers: dict):
    """Long streams back to back in a thread (each :data:`BUSY_TOKENS` tokens), until the returned event is
    set; their stamps are told from the measured ones' by their ``max_new_tokens``."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            one_request(url, headers, BUSY_TOKENS)

    for _ in range(2):  # two, so one is always running while the other starts its next
        threading.Thread(target=run, daemon=True).start()
    return stop


def one_request(url: str, headers: dict, max_tokens: int) -> dict:
    """One streamed completion on this thread's kept-alive connection (as vLLM's client keeps one): when
    sent and when its first event was read."""
    import httpx

    client = getattr(_clients, "client", None)
    if client is None:  # made once: an httpx client builds an SSL context (~20 ms) even for http://
        client = _clients.client = httpx.Client(timeout=60)
    body = {"model": "model", "prompt": "The cell", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    sent = time.time()
    read = request_id = None
    with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if read is None and line.startswith("data: "):
                read = time.time()
                request_id = json.loads(line.removeprefix("data: "))["id"].removeprefix("cmpl-")
    return {"request_id": request_id, "sent": sent, "read": read}


def probed_serve(home, stamps_file: Path):
    """:func:`bench_service.tpm_serve`, with this script's probes in the service's process."""
    from bench_service import tpm_serve

    return tpm_serve(home, [sys.executable, __file__, "--serve-probed", str(stamps_file), str(home.root)])


if __name__ == "__main__":
    main()
