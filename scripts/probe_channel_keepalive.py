"""Can a busy vLLM worker miss its back channel's keepalive (functions.back_channel.KEEPALIVE_S)?

The worker runs ``vllm.LLM`` in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the channel's
threads share the engine's GIL. While it generates (``--prompts`` x ``--tokens``, greedy), this process pings
a WebSocket server in another process every 50 ms with the sync client the worker uses, and a probe thread
sleeps 5 ms at a time: the longest ping round trip and the longest a thread waited past its sleep say how
near a keepalive timeout (20 s) a busy worker comes.

Usage:
    python scripts/probe_channel_keepalive.py [--demo-dir DIR] [--prompts 64] [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import demo_model, log, machine

SERVER = """
import asyncio, sys, websockets
async def drain(socket):
    async for _ in socket:
        pass
async def main():
    async with websockets.serve(drain, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as the worker's backend
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from websockets.sync.client import connect

    log(machine())
    with tempfile.TemporaryDirectory() as scratch:
        model = demo_model(Path(scratch) / "demo", args.demo_dir)
        server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            llm = LLM(model=str(model), dtype="float32", enforce_eager=True, seed=0,
                      distributed_executor_backend="uni", disable_log_stats=True)
            stop, rtts, waits = threading.Event(), [], []
            with connect(f"ws://127.0.0.1:{port}", compression=None) as socket:
                def ping() -> None:
                    while not stop.is_set():
                        started = time.perf_counter()
                        socket.ping().wait(60)
                        rtts.append(time.perf_counter() - started)
                        time.sleep(0.05)

                def probe() -> None:
                    while not stop.is_set():
                        started = time.perf_counter()
                        time.sleep(0.005)
                        waits.append(time.perf_counter() - started - 0.005)

                threads = [threading.Thread(target=ping, daemon=True), threading.Thread(target=probe, daemon=True)]
                for thread in threads:
                    thread.start()
                started = time.perf_counter()
                llm.generate(["The river carries"] * args.prompts,
                             SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0), use_tqdm=False)
                generated_s = time.perf_counter() - started
                stop.set()
                for thread in threads:
                    thread.join(70)
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({"generate_s": round(generated_s, 2), "pings": len(rtts),
                      "ping_ms_median": round(statistics.median(rtts) * 1e3, 2),
                      "ping_ms_max": round(max(rtts) * 1e3, 1), "gil_wait_ms_max": round(max(waits) * 1e3, 1),
                      "gil_wait_ms_p99": round(sorted(waits)[int(len(waits) * 0.99)] * 1e3, 1),
                      "keepalive_timeout_ms": 20000}))
    log(machine())


if __name__ == "__main__":
    main()
