"""The service: what HTTP costs, and how it compares with vLLM's own OpenAI server, as ratios in one run.

* ``throughput``: N concurrent clients (default 32), each sending R requests
  of exactly T tokens (default 64) back to back, greedy, to ``/v1/completions``:
  tpm-fed's service (its replica on the vLLM backend) vs vLLM's own
  OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``)
  on the same model, driven by the same asyncio ``httpx`` load generator
  (target >= 0.9x); and the service vs a runtime called in-process
  (what the HTTP layer costs).
* ``latency``: 1-token requests one at a time, p50 over many: through
  ``/v1/completions`` vs a runtime in-process (target: the HTTP hop
  adds <= 3 ms at p50).
* ``submit``: ``tpm submit "..." --max-tokens 8`` wall time with the home's
  service warm vs the first call (service start + cold replica) (target:
  warm <= 0.5 s, >= 15x faster than a cold call).
* ``streaming``: time to first token, 16 concurrent streams of T tokens,
  through the service vs vLLM's own server on the same model (target: <=
  1.2x); and streamed vs non-streamed throughput through the service, 32
  concurrent clients (target: >= 0.95x).

Usage:
    python scripts/bench_service.py [--only throughput,latency,submit,streaming] [--concurrent 32]
        [--new-tokens 64] [--requests-each 4] [--repeats 3] [--latency-samples 200] [--join-for-s S]

Each server (vLLM's, ``tpm serve``) runs in its own process; the load
generator runs in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import PROMPTS, log, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bench_home(root: Path, model_dir: Path, backend: str, kinds: tuple[str, ...] = ("generate",),
               join_for_s: float | None = None):
    """A one-site home serving ``model_dir`` as ``model`` (for ``kinds``) on ``backend``, with a generous grant
    (``join_for_s``: the site's continuous-admission window, the site's default unless given)."""
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(root)
    shutil.copytree(model_dir, home.models_dir / "model")
    Federation(
        name=f"bench-{backend}",
        sites=[SiteConfig(name="local", max_batch_requests=256,
                          **({} if join_for_s is None else {"join_for_s": join_for_s}))],
        models=[ModelConfig(name="model", path=Path("models/model"), backend=backend, kinds=list(kinds))],
        projects=[ProjectConfig(name="bench", members=[LocalUser().current()], allocations={"local": 1e9})],
    ).dump(home.federation_file)
    return home


async def drive(url: str, model: str, clients: int, each: int, tokens: int, headers: dict,
                stream: bool = False, first_tokens: list[float] | None = None) -> tuple[float, int]:
    """``clients`` concurrent loops, each sending ``each`` completions back to back; (seconds, tokens).

    With ``stream``, each completion is read as server-sent events, and the
    seconds from sending to its first non-empty text go to ``first_tokens``.
    """
    import json

    import httpx

    async def one(body: dict, http: httpx.AsyncClient) -> int:
        if not stream:
            answer = await http.post(f"{url}/v1/completions", json=body, headers=headers)
            answer.raise_for_status()
            return answer.json()["usage"]["completion_tokens"]
        sent, first, used = time.perf_counter(), None, 0
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as answer:
            answer.raise_for_status()
            async for line in answer.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - sent
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        if first_tokens is not None and first is not None:
            first_tokens.append(first)
        return used

    async def one_client(index: int, http: httpx.AsyncClient) -> int:
        total = 0
        for turn in range(each):
            body = {"model": model, "prompt": PROMPTS[(index + turn) % len(PROMPTS)], "max_tokens": tokens,
                    "temperature": 0, "min_tokens": tokens}  # min_tokens (vLLM's extension): equal work
            total += await one(body, http)
        return total

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one_client(i, http) for i in range(clients)))
        return time.perf_counter() - started, sum(counts)


def start_vllm_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """vLLM's own OpenAI server on ``model_dir`` (``extra``: more of its command-line options); process, URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_file = open(model_dir.parent / "vllm-server.log", "wb")  # noqa: SIM115 - the server writes it while it runs
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
         "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--served-model-name", "vllm-model",
         "--seed", "0", *extra],  # request logging is off by default
        stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    from tpm_fed.connection import healthy

    deadline = time.monotonic() + 240
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = "\n".join(Path(log_file.name).read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"vLLM's server did not start:\n{tail}")
        time.sleep(0.5)
    return process, url


@contextlib.contextmanager
def tpm_serve(home, command: list[str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """``tpm serve`` for ``home`` in its own process (as vLLM's server runs in its own): URL, auth header.

    ``command`` starts it some other way (a script's probed service), on the same home."""
    from tpm_fed.connection import running_service

    log_file = open(home.root / "bench-service.log", "wb")  # noqa: SIM115 - the service writes it while it runs
    process = subprocess.Popen(command or [sys.executable, "-m", "tpm_fed.service", "--home", str(home.root)],
                               stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while (address := running_service(home)) is None or address.pid != process.pid:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("tpm serve did not start:\n" + (home.root / "bench-service.log").read_text()[-2000:])
        time.sleep(0.2)
    try:
        yield address.url, {"Authorization": f"Bearer {address.token}"}
    finally:
        process.terminate()
        process.wait(timeout=60)


def throughput(args, model_dir: Path, scratch: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tpm_fed.protocol.requests import GenerationRequest
    from tpm_fed.service.runtime import Runtime

    log("starting vLLM's own OpenAI server and tpm serve...")
    vllm_server, vllm_url = start_vllm_server(model_dir)
    runtime = Runtime(bench_home(scratch / "throughput", model_dir, "vllm"))
    try:
        with tpm_serve(bench_home(scratch / "throughput-service", model_dir, "vllm",
                                  join_for_s=args.join_for_s)) as (tpm_url, headers):
            def through_service() -> tuple[float, int]:
                return asyncio.run(drive(tpm_url, "model", args.concurrent, args.requests_each,
                                         args.new_tokens, headers))

            def through_vllm() -> tuple[float, int]:
                return asyncio.run(drive(vllm_url, "vllm-model", args.concurrent, args.requests_each,
                                         args.new_tokens, {}))

            def in_process() -> tuple[float, int]:
                def one_client(index: int) -> int:  # the same load: each client waits for its answer
                    return sum(runtime.submit(GenerationRequest.create(
                        PROMPTS[(index + turn) % len(PROMPTS)], "model", max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens)).result().usage.completion_tokens
                        for turn in range(args.requests_each))

                started = time.perf_counter()
                with ThreadPoolExecutor(args.concurrent) as clients:
                    tokens = sum(clients.map(one_client, range(args.concurrent)))
                return time.perf_counter() - started, tokens

            log("warming...")
            through_service(), through_vllm(), in_process()
            runs: dict[str, list[tuple[float, int]]] = {"vllm": [], "service": [], "in-process": []}
            started_on = machine()
            for repeat in range(args.repeats):
                log(f"  repeat {repeat + 1}/{args.repeats}")
                runs["vllm"].append(through_vllm())
                runs["service"].append(through_service())
                runs["in-process"].append(in_process())
    finally:
        runtime.close()
        vllm_server.terminate()
        vllm_server.wait(timeout=60)
    rates = {name: max(tokens / seconds for seconds, tokens in samples) for name, samples in runs.items()}
    tokens = {name: samples[0][1] for name, samples in runs.items()}
    print(f"started {started_on}; ended {machine()}")
    print(f"throughput: {args.concurrent} clients x {args.requests_each} requests x {args.new_tokens} tokens, "
          f"greedy, best of {args.repeats} (tokens per run: {tokens})")
    print(f"vLLM's own OpenAI server, /v1/completions:      {rates['vllm']:8.0f} tok/s")
    print(f"tpm serve (vLLM replica), /v1/completions:      {rates['service']:8.0f} tok/s  "
          f"{rates['service'] / rates['vllm']:5.2f}x vLLM's server")
    print(f"a runtime in this process (no HTTP):            {rates['in-process']:8.0f} tok/s  "
          f"HTTP costs {1 - rates['service'] / rates['in-process']:+.1%}")


def latency(args, model_dir: Path, scratch: Path) -> None:
    import httpx

    from tpm_fed.service.runtime import Runtime

    runtime = Runtime(bench_home(scratch / "latency", model_dir, "torch"))
    try:
        with tpm_serve(bench_home(scratch / "latency-service", model_dir, "torch")) as (url, headers), \
                httpx.Client(timeout=300) as http:
            body = {"model": "model", "prompt": "The cell", "max_tokens": 1, "temperature": 0}

            def over_http() -> float:
                started = time.perf_counter()
                http.post(f"{url}/v1/completions", json=body, headers=headers).raise_for_status()
                return time.perf_counter() - started

            def in_process() -> float:
                started = time.perf_counter()
                runtime.generate("The cell", "model", max_new_tokens=1).result()
                return time.perf_counter() - started

            for _ in range(20):
                over_http(), in_process()
            http_s, local_s = [], []
            for _ in range(args.latency_samples):
                http_s.append(over_http())
                local_s.append(in_process())
    finally:
        runtime.close()
    p50_http, p50_local = statistics.median(http_s), statistics.median(local_s)
    print(f"latency, 1-token requests one at a time, {args.latency_samples} each, interleaved ({machine()})")
    print(f"in-process runtime p50:     {p50_local * 1000:7.2f} ms")
    print(f"/v1/completions p50:        {p50_http * 1000:7.2f} ms  HTTP hop adds {(p50_http - p50_local) * 1000:+.2f} ms")


def submit(args, model_dir: Path, scratch: Path) -> None:
    home = bench_home(scratch / "submit", model_dir, "auto")
    env = {**os.environ, "TPM_HOME": str(home.root)}
    env.pop("TPM_URL", None)
    tpm = str(Path(sys.executable).with_name("tpm"))

    def call() -> float:
        started = time.perf_counter()
        subprocess.run([tpm, "submit", "The cell divides", "--max-tokens", "8"], env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - started

    try:
        cold = call()
        warm = sorted(call() for _ in range(args.repeats * 3))
    finally:
        subprocess.run([tpm, "service", "stop"], env=env, capture_output=True)
    median = statistics.median(warm)
    print(f"tpm submit --max-tokens 8 ({machine()})")
    print(f"first call (starts the service, cold replica): {cold:6.2f} s")
    print(f"warm calls, median of {len(warm)}:               {median:6.2f} s  ({cold / median:.0f}x faster; "
          f"best {warm[0]:.2f} s)")


def streaming(args, model_dir: Path, scratch: Path) -> None:
    """Time to first token vs vLLM's own server; streamed vs whole answers through the service."""
    log("starting vLLM's own OpenAI server...")
    vllm_server, vllm_url = start_vllm_server(model_dir)
    first: dict[str, list[float]] = {"vllm": [], "service": []}
    # vLLM's own server, streamed and whole, is the yardstick for what streaming itself costs
    # here: the load generator parses every event on the same 2 CPUs the engine uses.
    rates: dict[str, list[float]] = {"streamed": [], "whole": [], "vllm streamed": [], "vllm whole": []}
    try:
        home = bench_home(scratch / "streaming", model_dir, "vllm", join_for_s=args.join_for_s)
        with tpm_serve(home) as (tpm_url, headers):
            def run(url, model, clients, stream, firsts=None, hdrs=headers):
                seconds, tokens = asyncio.run(drive(url, model, clients, args.requests_each, args.new_tokens,
                                                    hdrs, stream=stream, first_tokens=firsts))
                return tokens / seconds

            log("warming...")
            run(tpm_url, "model", 16, True), run(vllm_url, "vllm-model", 16, True, hdrs={})
            started_on = machine()
            for repeat in range(args.repeats):
                log(f"  repeat {repeat + 1}/{args.repeats}")
                run(vllm_url, "vllm-model", 16, True, first["vllm"], hdrs={})
                run(tpm_url, "model", 16, True, first["service"])
                rates["whole"].append(run(tpm_url, "model", args.concurrent, False))
                rates["streamed"].append(run(tpm_url, "model", args.concurrent, True))
                rates["vllm whole"].append(run(vllm_url, "vllm-model", args.concurrent, False, hdrs={}))
                rates["vllm streamed"].append(run(vllm_url, "vllm-model", args.concurrent, True, hdrs={}))
    finally:
        vllm_server.terminate()
        vllm_server.wait(timeout=60)
    p50 = {name: statistics.median(values) for name, values in first.items()}
    best = {name: max(values) for name, values in rates.items()}
    print(f"started {started_on}; ended {machine()}")
    print(f"time to first token, 16 concurrent streams x {args.requests_each} x {args.new_tokens} tokens, "
          f"median of {len(first['service'])}:")
    print(f"vLLM's own OpenAI server:     {p50['vllm'] * 1000:8.1f} ms")
    print(f"tpm serve (vLLM replica):     {p50['service'] * 1000:8.1f} ms  {p50['service'] / p50['vllm']:5.2f}x")
    print(f"throughput through the service, {args.concurrent} concurrent, best of {args.repeats}:")
    print(f"whole answers:                {best['whole']:8.0f} tok/s")
    print(f"streamed:                     {best['streamed']:8.0f} tok/s  {best['streamed'] / best['whole']:5.2f}x")
    print(f"the same through vLLM's own OpenAI server, {args.concurrent} concurrent, best of {args.repeats}:")
    print(f"whole answers:                {best['vllm whole']:8.0f} tok/s")
    print(f"streamed:                     {best['vllm streamed']:8.0f} tok/s  "
          f"{best['vllm streamed'] / best['vllm whole']:5.2f}x")
    print(f"service streamed / vLLM streamed: {best['streamed'] / best['vllm streamed']:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="throughput,latency,submit,streaming")
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-each", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--join-for-s", type=float, default=None,
                        help="the service's site admits requests into running tasks this long (0: off; "
                             "default: the site's default)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tpm_fed.models.demo import make_demo_model

    scratch = Path(tempfile.mkdtemp(prefix="tpm-bench-service-"))
    try:
        log("making the demo model...")
        model_dir = make_demo_model(scratch / "demo", progress=False)
        for name in args.only.split(","):
            {"throughput": throughput, "latency": latency, "submit": submit,
             "streaming": streaming}[name](args, model_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
