"""One batch on a federation of two local sites vs one: does the broker spread it, and what does it buy?

Two homes on the demo model (torch backend): one local site, or two (``a``
and ``b``, one replica each, the project granted on both). Both replicas are
warmed first; then the same file of ``--lines`` completions runs through the
batch API, timed from submit to the batch's end. Printed: seconds each way,
the ratio (target >= 1.7x), how many lines each site served, the CPU seconds
spent during the batch by the service's own process, by its child processes
(the sites' interchanges) and by the sites' worker pools (Parsl starts them
detached: found by their command line), and how many cores that kept busy
on average; and, from the service's database, when the batch's phases ended
(created, first and last line) and each task's span per site. The client waits
with the service's long poll (``Client.batches.wait``), so "seen" follows the
batch's end at once.

To separate the machine from the service, the same lines also run with no
service at all: the torch backend called directly in one process, then split
over two processes started together (each loads the model before the clock
starts, and runs its half in tasks of 64 as a replica does). Two bare
processes over one is the most two replicas can give on this machine. Then
the same bare runs beside one more process that keeps the service's share of
a core busy (its CPU over the batch's time, as measured above, spent in 10 ms
cycles): what the machine gives two replicas and a service that costs that
much CPU but adds no latency, so that what is left of the gap is the service's
latency (its hops, the batch's start and end). Each bare figure is the best of
``--repeats``, as the service's are.

Usage:
    python scripts/bench_batch_sites.py [--lines 256] [--tokens 32] [--threads 1] [--repeats 1]
        [--demo-dir DIR] [--no-bare] [--profile DIR]

``--repeats`` runs the batch that many times on each warm service (one site,
then two), so a figure is not one run's. ``--profile DIR`` records the
service's process with py-spy (``pip install -e ".[bench]"``) during each
timed batch, as raw collapsed stacks in DIR (one file per run), for
``scripts/profile_stacks.py`` to count.

``--threads`` sets torch's intra-op threads per worker (``OMP_NUM_THREADS``),
so two replicas on a small machine do not fight over the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import demo_model, log, machine, py_spy
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


def run(home, sites: list[str], source: bytes, repeats: int = 1, profile: Path | None = None
        ) -> list[tuple[float, Counter, tuple[float, float, float]]]:
    """Per repeat: seconds for the batch, lines per site, and CPU seconds of (the service's process, its
    children, the sites' workers), on one warm service."""
    import psutil

    from tpm_fed.client import Client
    from tpm_fed.connection import running_service

    runs = []
    with tpm_serve(home) as (url, headers):
        client = Client(url, headers["Authorization"].split()[1])
        for site in sites:  # a warm replica at every site
            client.generate("warm", max_new_tokens=2, site=site).result()
        service = psutil.Process(running_service(home).pid)
        for repeat in range(repeats):
            spy = _py_spy(service.pid, profile / f"{len(sites)}-sites-{repeat + 1}.txt") if profile else None
            before = _cpu(service, home)
            started, wall = time.perf_counter(), time.time()
            batch = client.batches.wait(client.batches.submit(source)["id"], poll_s=0.1)
            took = time.perf_counter() - started
            after = _cpu(service, home)
            log("    " + _timeline(home, batch["id"], wall, wall + took))
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and ends
                spy.wait(timeout=60)
            assert batch["status"] == "completed", batch
            served = Counter(line["response"]["body"]["tpm"]["site"]
                             for line in client.batches.results(batch["id"]))
            runs.append((took, served, tuple(a - b for a, b in zip(after, before))))
            log(f"  {len(sites)} site(s), run {repeat + 1}: {took:.2f} s, service CPU {runs[-1][2][0]:.2f} s "
                f"(ended at {time.time():.2f})")
        client.close()
    return runs


def _timeline(home, batch_id: str, submitted: float, seen: float) -> str:
    """When the batch's phases ended, in seconds from its submit (from the service's database)."""
    from sqlalchemy import create_engine, func, select

    from tpm_fed.batches.tables import batch_lines_table, batches_table
    from tpm_fed.state.schema import requests_table

    b, line = batches_table.c, batch_lines_table.c
    engine = create_engine(home.database_url)
    with engine.connect() as db:
        created, completed = db.execute(select(b.created_at, b.completed_at).where(b.batch_id == batch_id)).one()
        first, last = db.execute(select(func.min(line.finished_at), func.max(line.finished_at))
                                 .where(line.batch_id == batch_id)).one()
        ids = [rid for (text,) in db.execute(select(line.request_ids).where(line.batch_id == batch_id))
               for rid in text.split()]
        r = requests_table.c
        tasks: dict[tuple[str, float, float], int] = Counter(  # the log's times are per task: sent, ended
            (row.site, row.submitted_at, row.finished_at) for row in db.execute(
                select(r.site, r.submitted_at, r.finished_at).where(r.request_id.in_(ids))))
    engine.dispose()
    by_site: dict[str, list[str]] = {}
    for (site, sent, ended), rows in sorted(tasks.items(), key=lambda item: item[0][1]):
        by_site.setdefault(site, []).append(f"{sent - submitted:.2f}-{ended - submitted:.2f} ({rows})")
    return (f"created (upload, quote) {created - submitted:.2f} s, first line ended {first - submitted:.2f} s, "
            f"last {last - submitted:.2f} s, completed {completed - submitted:.2f} s, seen {seen - submitted:.2f} s; "
            "tasks sent-ended (lines): " + "; ".join(f"{site}: {', '.join(spans)}" for site, spans in by_site.items()))


def _py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` into ``out`` as raw collapsed stacks: per thread, only while it holds the GIL (a
    thread waiting for it is not counted as working; C code that releases it, as SQLite does, is missed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([py_spy() or "py-spy", "record", "--pid", str(pid), "--format", "raw",
                            "--rate", "200", "--threads", "--gil", "--nonblocking", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return spy


def _cpu(service, home) -> tuple[float, float, float]:
    """CPU seconds (user + system) of the service's own process, of its descendants (the sites'
    interchanges), and of the sites' worker pools with their workers (started through job scripts that
    exit, so not the service's descendants: found by their command line, which names the home)."""
    import psutil

    def seconds(processes) -> float:
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # a process that ended between listing and reading
                pass
        return total

    children = set(service.children(recursive=True))
    pools = set()
    for other in psutil.process_iter():
        try:
            if other not in children and other.pid != service.pid and str(home.root) in " ".join(other.cmdline()):
                pools |= {other, *other.children(recursive=True)}
        except psutil.Error:
            continue
    return seconds([service]), seconds(children), seconds(pools - children)


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


BURN_PERIOD_S = 0.01
"""The stand-in service's duty cycle: busy for its share of every 10 ms (the service's work comes in bursts of
about that length: a task's results, the next task's placement)."""


def _burner(duty: float, start, stop) -> None:
    """Keep ``duty`` of a core busy (pure Python, as the service's work is) from ``start`` until ``stop``."""
    start.wait()
    while not stop.is_set():
        began = time.perf_counter()
        while time.perf_counter() - began < duty * BURN_PERIOD_S:
            pass
        time.sleep(max(0.0, began + BURN_PERIOD_S - time.perf_counter()))


def bare(model_dir: Path, prompts: list[str], tokens: int, processes: int, duty: float = 0.0) -> float:
    """Seconds for ``prompts`` split over ``processes`` bare torch processes started together; with ``duty``,
    beside one more process that keeps that share of a core busy meanwhile (a stand-in for the service's CPU)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, done, start, stop = context.Queue(), context.Queue(), context.Event(), context.Event()
    shares = [prompts[index::processes] for index in range(processes)]
    workers = [context.Process(target=_bare_worker, args=(str(model_dir), share, tokens, ready, start, done))
               for share in shares]
    burners = [context.Process(target=_burner, args=(duty, start, stop))] if duty > 0 else []
    for process in workers + burners:
        process.start()
    for _ in workers:
        ready.get(timeout=300)
    started = time.perf_counter()
    start.set()
    finished = max(done.get(timeout=600) for _ in workers)
    stop.set()
    for process in workers + burners:
        process.join()
    return finished - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="batches per service, one after the other")
    parser.add_argument("--demo-dir", type=Path, default=None, help="copy this demo model (else train one)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare torch processes")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the service into this folder")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by tpm serve and its workers

    print(f"bench_batch_sites: {machine()}, OMP_NUM_THREADS={args.threads}")
    source = batch_file(args.lines, [args.tokens])
    with tempfile.TemporaryDirectory(prefix="tpm-bench-sites-") as scratch:
        scratch = Path(scratch)
        model_dir = demo_model(scratch / "demo", args.demo_dir)
        log("one site...")
        ones = run(home_with_sites(scratch / "one", model_dir, ["a"]), ["a"], source, args.repeats, args.profile)
        log("two sites...")
        twos = run(home_with_sites(scratch / "two", model_dir, ["a", "b"]), ["a", "b"], source, args.repeats,
                   args.profile)
        prompts = [json.loads(line)["body"]["prompt"] for line in source.decode().splitlines()]
        if not args.no_bare:
            log("the same lines with no service: one bare torch process, then two...")
            bare_one = min(bare(model_dir, prompts, args.tokens, 1) for _ in range(args.repeats))
            bare_two = min(bare(model_dir, prompts, args.tokens, 2) for _ in range(args.repeats))
            # The service's share of a core while it ran each batch (its CPU over the batch's time, the median
            # repeat), kept busy beside the bare processes: what the machine gives two replicas and a service
            # that costs this much CPU and adds no latency.
            duty_one, duty_two = (statistics.median(own / took for took, _, (own, _, _) in runs)
                                  for runs in (ones, twos))
            log(f"again beside a process keeping {duty_one:.0%} / {duty_two:.0%} of a core busy...")
            burnt_one = min(bare(model_dir, prompts, args.tokens, 1, duty_one) for _ in range(args.repeats))
            burnt_two = min(bare(model_dir, prompts, args.tokens, 2, duty_two) for _ in range(args.repeats))
    print(f"\n{args.lines} lines x {args.tokens} tokens through the batch API ({machine()})")
    for name, runs in (("one site", ones), ("two sites", twos)):
        for took, served, (own, children, workers) in runs:
            print(f"  {name:9s}: {took:7.2f} s   lines per site {dict(served)}   CPU s: service {own:.2f} "
                  f"({1000 * own / args.lines:.2f} ms a line), interchanges {children:.2f}, workers {workers:.2f}; "
                  f"all together {(own + children + workers) / took:.2f} cores busy")
    one, two = min(r[0] for r in ones), min(r[0] for r in twos)
    print(f"  two / one: {one / two:7.2f}x faster, best of {args.repeats} each   (target >= 1.7x)")
    if args.repeats > 1:
        print("  per repeat: " + ", ".join(f"{a[0] / b[0]:.2f}x" for a, b in zip(ones, twos)))
    if not args.no_bare:
        print("the same lines, torch backend called directly (no service, no sites)")
        print(f"  one process:   {bare_one:7.2f} s")
        print(f"  two processes: {bare_two:7.2f} s")
        print(f"  two / one:     {bare_one / bare_two:7.2f}x   (the machine's ceiling for two replicas)")
        print(f"  service / bare: one site {bare_one / one:.2f}x, two sites {bare_two / two:.2f}x")
        print(f"the same, beside a process keeping the service's share of a core busy ({duty_one:.0%} of a core "
              f"with one site, {duty_two:.0%} with two: its CPU over the batch's time, median repeat)")
        print(f"  one process:   {burnt_one:7.2f} s")
        print(f"  two processes: {burnt_two:7.2f} s")
        print(f"  two / one:     {burnt_one / burnt_two:7.2f}x   (the machine's ceiling for two replicas and a "
              "service of this CPU that adds no latency)")


if __name__ == "__main__":
    main()
