"""One batch on a federation of two local sites vs one: does the broker spread it, and what does it buy?

Two homes on the demo model (torch backend): one local site, or two (``a``
and ``b``, one replica each, the project granted on both). Both replicas are
warmed first; then the same file of ``--lines`` completions runs through the
batch API, timed from submit to the batch's end. Printed: seconds each way,
the ratio (target >= 1.7x), how many lines each site served, and the CPU
seconds the service's own process and its child processes (the sites'
interchanges; Parsl starts the worker pools detached, so they are not
counted) spent during the batch.

To separate the machine from the service, the same lines also run with no
service at all: the torch backend called directly in one process, then split
over two processes started together (each loads the model before the clock
starts, and runs its half in tasks of 64 as a replica does). Two bare
processes over one is the most two replicas can give on this machine.

Usage:
    python scripts/bench_batch_sites.py [--lines 256] [--tokens 32] [--threads 1]

``--threads`` sets torch's intra-op threads per worker (``OMP_NUM_THREADS``),
so two replicas on a small machine do not fight over the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import log, machine
from bench_quotes import batch_file
from bench_service import tpm_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def home_with_sites(root: Path, model_dir: Path, sites: list[str]):
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(root)
    shutil.copytree(model_dir, home.models_dir / "model")
    Federation(
        name="bench-sites",
        sites=[SiteConfig(name=name, max_batch_requests=64) for name in sites],
        models=[ModelConfig(name="model", path=Path("models/model"), backend="torch")],
        projects=[ProjectConfig(name="bench", members=[LocalUser().current()],
                                allocations={name: 1e9 for name in sites})],
    ).dump(home.federation_file)
    return home


def run(home, sites: list[str], source: bytes) -> tuple[float, Counter, tuple[float, float]]:
    """Seconds for the batch, lines per site, and CPU seconds of (the service's process, its children)."""
    import psutil

    from tpm_fed.client import Client
    from tpm_fed.connection import running_service

    with tpm_serve(home) as (url, headers):
        client = Client(url, headers["Authorization"].split()[1])
        for site in sites:  # a warm replica at every site
            client.generate("warm", max_new_tokens=2, site=site).result()
        service = psutil.Process(running_service(home).pid)
        before = _cpu(service)
        started = time.perf_counter()
        batch = client.batches.wait(client.batches.submit(source)["id"], poll_s=0.1)
        took = time.perf_counter() - started
        after = _cpu(service)
        assert batch["status"] == "completed", batch
        served = Counter(line["response"]["body"]["tpm"]["site"] for line in client.batches.results(batch["id"]))
        client.close()
    return took, served, (after[0] - before[0], after[1] - before[1])


def _cpu(service) -> tuple[float, float]:
    """CPU seconds (user + system) of the service's own process, and of all its descendants
    (the interchanges; the worker pools run detached from it)."""
    own = service.cpu_times()
    rest = 0.0
    for child in service.children(recursive=True):
        try:
            times = child.cpu_times()
            rest += times.user + times.system
        except Exception:  # a worker that ended between listing and reading
            pass
    return own.user + own.system, rest


def _bare_worker(model_dir: str, prompts: list[str], tokens: int, ready, start, done) -> None:
    """One process: the torch backend called directly on its share of the lines, in tasks of 64."""
    from functions.backends.base import encode_request
    from functions.backends.torch_backend import TorchBackend
    from tpm_fed.protocol.model import ModelSpec
    from tpm_fed.protocol.requests import GenerationRequest
    from tpm_fed.protocol.versions import hash_model_dir

    spec = ModelSpec(name="model", version=hash_model_dir(Path(model_dir)), path=model_dir, backend="torch")
    backend = TorchBackend.load(spec)
    requests = [GenerationRequest.create(p, "model", max_new_tokens=tokens) for p in prompts]
    encoded = [encode_request(backend.tokenizer, r, backend.context_length) for r in requests]
    ready.put(True)
    start.wait()
    for first in range(0, len(encoded), 64):
        backend.generate(encoded[first:first + 64])
    done.put(time.perf_counter())


def bare(model_dir: Path, prompts: list[str], tokens: int, processes: int) -> float:
    """Seconds for ``prompts`` split over ``processes`` bare torch processes started together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, done, start = context.Queue(), context.Queue(), context.Event()
    shares = [prompts[index::processes] for index in range(processes)]
    workers = [context.Process(target=_bare_worker, args=(str(model_dir), share, tokens, ready, start, done))
               for share in shares]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=300)
    started = time.perf_counter()
    start.set()
    finished = max(done.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return finished - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by tpm serve and its workers

    from tpm_fed.models.demo import make_demo_model

    print(f"bench_batch_sites: {machine()}, OMP_NUM_THREADS={args.threads}")
    source = batch_file(args.lines, [args.tokens])
    with tempfile.TemporaryDirectory(prefix="tpm-bench-sites-") as scratch:
        scratch = Path(scratch)
        model_dir = make_demo_model(scratch / "demo", progress=False)
        log("one site...")
        one, one_served, one_cpu = run(home_with_sites(scratch / "one", model_dir, ["a"]), ["a"], source)
        log("two sites...")
        two, two_served, two_cpu = run(home_with_sites(scratch / "two", model_dir, ["a", "b"]), ["a", "b"], source)
        prompts = [json.loads(line)["body"]["prompt"] for line in source.decode().splitlines()]
        log("the same lines with no service: one bare torch process, then two...")
        bare_one = bare(model_dir, prompts, args.tokens, 1)
        bare_two = bare(model_dir, prompts, args.tokens, 2)
    print(f"\n{args.lines} lines x {args.tokens} tokens through the batch API")
    print(f"  one site:  {one:7.2f} s   lines per site {dict(one_served)}   "
          f"CPU s: service {one_cpu[0]:.2f}, interchanges {one_cpu[1]:.2f}")
    print(f"  two sites: {two:7.2f} s   lines per site {dict(two_served)}   "
          f"CPU s: service {two_cpu[0]:.2f}, interchanges {two_cpu[1]:.2f}")
    print(f"  two / one: {one / two:7.2f}x faster   (target >= 1.7x)")
    print("the same lines, torch backend called directly (no service, no sites)")
    print(f"  one process:   {bare_one:7.2f} s")
    print(f"  two processes: {bare_two:7.2f} s")
    print(f"  two / one:     {bare_one / bare_two:7.2f}x   (the machine's ceiling for two replicas)")
    print(f"  service / bare: one site {bare_one / one:.2f}x, two sites {bare_two / two:.2f}x")


if __name__ == "__main__":
    main()
