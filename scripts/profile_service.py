"""Where the service's CPU goes under 1-token requests from 64 clients, against vLLM's own server.

vLLM's own benchmark client (``vllm.benchmarks.serve``, unchanged, as
``scripts/bench_vllm_client.py`` runs it) sends the ``one-token`` load (64
concurrent clients, 64 prompt tokens, 1 output token) to vLLM's OpenAI
server and to the service (``tpm serve``, one local site, the demo model on
vLLM), in one run. For each server it reports requests per second and CPU
milliseconds per request, from the CPU times of its processes before and
after the load (``psutil``):

* vLLM's server: its API process, and with its engine process(es);
* the service: its own process (HTTP, auth, placement, ledger, metrics,
  the back channel), and with everything it started (the site's
  interchange and worker, the worker's vLLM engine).

Then the service runs the load again under ``py-spy record`` (sampling its
own process, ``--nonblocking``, so the profiled process is not paused, and
``--gil``, so only threads holding the GIL are sampled: CPU spent in Python,
not threads waiting on a lock or a socket, which py-spy cannot tell from work
without pausing the process; with ``--worker``, the site's worker too) and
the profile's top functions are printed: by self time (where the CPU is
spent) and by inclusive time among tpm_fed's own functions (which of our
code paths it is spent under). The raw collapsed stacks are kept where
``--keep`` says.

Usage:
    python scripts/profile_service.py [--demo-dir DIR] [--num-prompts 256] [--rate 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_service import bench_home, start_vllm_server, tpm_serve
from bench_vllm_client import LOADS, run_client
from benchlib import demo_model, log, machine, py_spy


def processes_of(pid: int, home: Path | None, children: bool) -> set:
    """``pid`` (with ``children``, its live descendants), and with ``home`` every process whose command
    line names the home, with its descendants (see :func:`cpu_seconds`)."""
    import psutil

    process = psutil.Process(pid)
    processes = {process, *(process.children(recursive=True) if children else [])}
    if home is not None:
        for other in psutil.process_iter():
            try:
                if str(home) in " ".join(other.cmdline()):
                    processes |= {other, *other.children(recursive=True)}
            except psutil.Error:
                continue
    return processes


def cpu_seconds(pid: int, children: bool, home: Path | None = None) -> float:
    """User + system CPU seconds of ``pid`` (and of every live descendant with ``children``).

    A local site's worker pool is started through a job script that exits, so the pool is the
    init process's child, not the service's: with ``home``, every process whose command line
    names the home (the job scripts) and their descendants count too.
    """
    import psutil

    total = 0.0
    for each in processes_of(pid, home if children else None, children):
        try:
            times = each.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def measured(pid: int, run, home: Path | None = None) -> tuple[dict, float, float, list]:
    """Run the load; (the client's result, CPU s of ``pid`` alone, CPU s of ``pid`` and what it started,
    (CPU s, (pid, name)) of each process, most first)."""
    own, everything = cpu_seconds(pid, False), cpu_seconds(pid, True, home)
    parts = cpu_by_process(pid, home)
    result = run()
    after = cpu_by_process(pid, home)
    done = max(result["completed"], 1)
    spent = sorted(((after[key] - parts.get(key, 0.0), key) for key in after), reverse=True)
    log("CPU ms per request by process: " + "; ".join(f"{name} (pid {key}) {1000 * s / done:.2f}"
                                                      for s, (key, name) in spent[:6]))
    return result, cpu_seconds(pid, False) - own, cpu_seconds(pid, True, home) - everything, spent


def cpu_by_process(pid: int, home: Path | None) -> dict[tuple[int, str], float]:
    """CPU seconds of ``pid`` and of each process counted with it (see :func:`cpu_seconds`), by (pid, a short name)."""
    import psutil

    seconds = {}
    for each in processes_of(pid, home, True):
        try:
            times, words = each.cpu_times(), each.cmdline()
        except psutil.Error:
            continue
        name = " ".join(word.rpartition("/")[2] for word in words[:3])[:60] or each.name()
        seconds[(each.pid, name)] = times.user + times.system
    return seconds


def top_of_profile(collapsed: Path, count: int = 18) -> list[str]:
    """The profile's top functions: by self samples, and tpm_fed's by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    library: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames, n = stack.split(";"), int(samples)
        total += n
        own[frames[-1]] += n
        library[_library(frames[-1])] += n
        # The innermost of our functions the sample is under (the route, the engine, the middleware...).
        ours = [frame for frame in frames if "tpm_fed/" in frame and "__main__" not in frame
                and "run_service" not in frame and "cli.py" not in frame]
        under[ours[-1] if ours else "(no tpm_fed frame: a library's own thread)"] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; by self time (the function on top of the stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += ["by the library of the function on top:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in library.most_common(count)]
    lines += ["by the innermost tpm_fed function the sample is under:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in under.most_common(count)]
    return lines


def _library(frame: str) -> str:
    """``json`` from ``dumps (json/encoder.py:200)``: the package (or stdlib module) a frame's file is in."""
    where = frame.rpartition("(")[2].split(":")[0]
    parts = where.split("/")
    return parts[0] if len(parts) > 1 else where.removesuffix(".py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=None, help="a trained demo model folder to copy")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--keep", type=Path, default=None, help="copy the collapsed py-spy profile here")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--no-vllm", action="store_true", help="the service alone (no vLLM server run)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="then this many more measured rounds against one service (does its CPU per request grow?)")
    parser.add_argument("--gap", type=float, default=3.0,
                        help="seconds between rounds (more than the worker's 1 s idle wait: each round starts a task)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy run")
    parser.add_argument("--worker", action="store_true",
                        help="profile the busiest process the service started (its site's worker) too")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if (spy_command := py_spy()) is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")

    scratch = Path(tempfile.mkdtemp(prefix="tpm-profile-service-"))
    load = LOADS["one-token"]
    started_on = machine()
    rows: list[str] = []
    profile_lines: list[str] = []
    worker_lines: list[str] = []
    try:
        demo = demo_model(scratch / "demo", args.demo_dir)
        home = bench_home(scratch / "home", demo, "vllm")
        if not args.no_vllm:
            vllm_server_run(demo, load, scratch, args.num_prompts, rows)
        with tpm_serve(home) as (url, headers):
            from tpm_fed.connection import running_service

            pid = running_service(home).pid
            token = headers["Authorization"].removeprefix("Bearer ")

            def against_service(tag: str) -> dict:
                return run_client(url, "model", demo, load, scratch / tag, token, args.num_prompts)

            log("the service: warm-up (starts its replica), then the measured run")
            against_service("service-warm")
            result, own, everything, spent = measured(pid, lambda: against_service("service-run"), home.root)
            # The busiest process the service started (the worker driving the engine), profiled beside it.
            worker = next((key[0] for _, key in spent if key[0] != pid), None) if args.worker else None
            rows.append(_row("the service", result, own, everything, "its own process", "with its site and engine"))
            rows += rounds(pid, home.root, against_service, args.rounds, args.gap)
            if args.no_profile:
                return print_rows(started_on, args.num_prompts, rows, [])
            log("the service again, under py-spy")
            collapsed = scratch / "service.collapsed"
            spy = subprocess.Popen([spy_command, "record", "--pid", str(pid), "--rate", str(args.rate), "--nonblocking",
                                    "--gil",
                                    "--format", "raw", "--output", str(collapsed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            worker_spy = None if worker is None else subprocess.Popen(
                [spy_command, "record", "--pid", str(worker), "--rate", str(args.rate), "--nonblocking", "--gil",
                 "--format", "raw", "--output", str(scratch / "worker.collapsed")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached before the load starts
            began = time.perf_counter()
            profiled = against_service("service-profiled")
            seconds = time.perf_counter() - began
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=60)
            if worker_spy is not None:
                worker_spy.send_signal(2)
                worker_spy.wait(timeout=60)
                if (scratch / "worker.collapsed").exists():
                    worker_lines = [f"the worker (pid {worker}):", *top_of_profile(scratch / "worker.collapsed")]
            rows.append(f"the service under py-spy: {profiled['request_throughput']:.1f} req/s "
                        f"({profiled['completed']} done, {profiled['failed']} failed, {seconds:.1f} s)")
            profile_lines += top_of_profile(collapsed) if collapsed.exists() else [
                f"py-spy wrote no profile: {spy.stderr.read().decode(errors='replace')[-500:]}"]
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(collapsed, args.keep / "service.collapsed")
                if (scratch / "worker.collapsed").exists():
                    shutil.copy(scratch / "worker.collapsed", args.keep / "worker.collapsed")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_rows(started_on, args.num_prompts, rows, ["the service's own process:", *profile_lines, *worker_lines])


def print_rows(started_on: str, num_prompts: int, rows: list[str], profile: list[str]) -> None:
    print(f"started {started_on}; ended {machine()}")
    print(f"1-token requests, 64 clients, {num_prompts} requests, vLLM's benchmark client:")
    for row in rows:
        print(row)
    print("\n".join(profile))


def rounds(pid: int, home: Path, against_service, count: int, gap_s: float) -> list[str]:
    """``count`` more runs against the same service, ``gap_s`` apart: per round, its rate and the CPU ms
    per request of its own process and of the busiest process it started (the worker). A figure that
    rises round after round is state that grows over the service's life (or a task's, with no gap)."""
    import psutil

    rows = []
    for number in range(1, count + 1):
        time.sleep(gap_s)
        result, own, _, spent = measured(pid, lambda number=number: against_service(f"round-{number}"), home)
        done = max(result["completed"], 1)
        worker = next(((s, key) for s, key in spent if key[0] != pid), (0.0, (0, "-")))
        sizes = {key[0]: psutil.Process(key[0]).memory_info().rss / 2**20 for _, key in spent[:2]
                 if psutil.pid_exists(key[0])}
        rows.append(f"round {number}: {result['request_throughput']:.1f} req/s ({result['completed']} done, "
                    f"{result['failed']} failed); CPU ms per request: service {1000 * own / done:.2f}, "
                    f"busiest other ({worker[1][1][:30]}) {1000 * worker[0] / done:.2f}; resident MiB: "
                    f"service {sizes.get(pid, 0):.0f}, other {sizes.get(worker[1][0], 0):.0f}")
        log(rows[-1])
    return rows


def vllm_server_run(demo: Path, load: dict, scratch: Path, num_prompts: int, rows: list[str]) -> None:
    """vLLM's own server under the same load: a warm-up, then the measured run."""
    log("starting vLLM's own OpenAI server...")
    server, url = start_vllm_server(demo)
    try:
        def against_vllm(tag: str) -> dict:
            return run_client(url, "vllm-model", demo, load, scratch / tag, None, num_prompts)

        log("vLLM's server: warm-up, then the measured run")
        against_vllm("vllm-warm")
        result, own, everything, _ = measured(server.pid, lambda: against_vllm("vllm-run"))
        rows.append(_row("vLLM's server", result, own, everything, "its API process", "with its engine"))
    finally:
        server.terminate()
        server.wait(timeout=60)


def _row(name: str, result: dict, own: float, everything: float, own_label: str, all_label: str) -> str:
    done = max(result["completed"], 1)
    return (f"{name}: {result['request_throughput']:.1f} req/s ({result['completed']} done, {result['failed']} failed); "
            f"CPU per request: {own_label} {1000 * own / done:.1f} ms, {all_label} {1000 * everything / done:.1f} ms")


if __name__ == "__main__":
    main()
