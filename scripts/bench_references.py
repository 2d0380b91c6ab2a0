"""Results by reference and sessions, as ratios in one run.

* ``fetch``: a ~256 MB trace result (lm_head output of many prompts) read by
  reference, straight from the site's store (what a caller on the same file
  system does) and streamed through the service (what any other caller
  does), vs reading the same bytes from a local file in the same chunks
  (target: >= 0.8x).
* ``memory``: the peak extra memory of a fresh process that streams the same
  result to disk through the service (target: <= 64 MB), next to one that
  holds it whole (what the measure sees when it is not bounded).
* ``session``: a 3-step session (save a layer for prompt A, for prompt B,
  then generate with their difference added) vs the same three steps as
  separate requests, the steering vector computed by the caller in between;
  wall time per run through the service (one placement and one queue wait
  instead of three, and no tensors shipped home and back).

Usage:
    python scripts/bench_references.py [--only fetch,memory,session] [--megabytes 256] [--repeats 5]

The service runs in its own process (``tpm serve``) on the demo model, made here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import demo_model, log, machine
from bench_service import bench_home, tpm_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LONG = " ".join(["the stars and the telescope"] * 24)  # ~240 tokens: 2 KB of lm_head output per position


def big_trace(client, megabytes: int):
    from tpm_fed.interventions import Save

    per_prompt = len(client.trace([LONG], steps=[Save(point="lm_head")]).result().tensors_blob)
    prompts = max(1, megabytes * 1024 * 1024 // per_prompt)
    log(f"  tracing {prompts} prompts (~{prompts * per_prompt / 2**20:.0f} MB of lm_head output)...")
    result = client.trace([LONG] * prompts, steps=[Save(point="lm_head")]).result()
    assert result.tensors_ref is not None, "the result came inline: is the site's result store set?"
    return result


def fetch(client, result, scratch: Path, repeats: int) -> None:
    from tpm_fed.protocol.references import CHUNK_BYTES
    from tpm_fed.references.reader import ServiceReader, StoreTensorReader

    reference = result.tensors_ref
    local = scratch / "local.bin"
    with open(local, "wb") as out:
        for chunk in StoreTensorReader().chunks(result.request_id, reference):
            out.write(chunk)

    def read_local() -> int:
        with open(local, "rb") as source:
            return sum(len(chunk) for chunk in iter(lambda: source.read(CHUNK_BYTES), b""))

    def read_store() -> int:
        return sum(len(chunk) for chunk in StoreTensorReader().chunks(result.request_id, reference))

    def read_store_unchecked() -> int:  # the same reads with no digest: what the check costs
        from tpm_fed.storage.result_stores import connector_for, key_for

        connector = connector_for(reference.store)
        return sum(len(connector.get(key_for(connector, name))) for name in reference.keys)

    def read_service() -> int:
        return sum(len(chunk) for chunk in ServiceReader(client._http)._download(result.request_id, reference))

    times: dict[str, list[float]] = {"local": [], "store": [], "unchecked": [], "service": []}
    for index in range(repeats):
        log(f"  repeat {index + 1}/{repeats}")
        for name, run in (("local", read_local), ("store", read_store), ("unchecked", read_store_unchecked),
                          ("service", read_service)):
            started = time.perf_counter()
            assert run() == reference.nbytes
            times[name].append(time.perf_counter() - started)
    mb = reference.nbytes / 1e6
    best = {name: min(samples) for name, samples in times.items()}
    print(f"\nfetch {mb:.0f} MB by reference (best of {repeats}; digest checked on the reference reads)")
    print(f"  local file, 16 MiB reads:       {mb / best['local']:8.0f} MB/s")
    print(f"  from the site's store (direct): {mb / best['store']:8.0f} MB/s  {best['local'] / best['store']:5.2f}x")
    print(f"  the same, digest not checked:   {mb / best['unchecked']:8.0f} MB/s  "
          f"{best['local'] / best['unchecked']:5.2f}x")
    print(f"  through the service (HTTP):     {mb / best['service']:8.0f} MB/s  {best['local'] / best['service']:5.2f}x")


STREAM = """
import json, sys
import httpx
from tpm_fed.protocol.references import TensorsReference
from tpm_fed.references.reader import ServiceReader
from tpm_fed.storage.atomic import write_chunks_atomically
def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
url, token, request_id, reference, out, whole = sys.argv[1:]
reference = TensorsReference.model_validate_json(reference)
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
    chunks = ServiceReader(http)._download(request_id, reference)
    before = peak_kb()
    written = len(b"".join(chunks)) if whole == "1" else write_chunks_atomically(out, chunks)
    print(json.dumps({"written": written, "growth_mb": (peak_kb() - before) / 1024}))
"""


def memory(url: str, token: str, result, scratch: Path) -> None:
    def run(whole: bool) -> dict:
        done = subprocess.run([sys.executable, "-c", STREAM, url, token, result.request_id,
                               result.tensors_ref.model_dump_json(), str(scratch / "out.safetensors"), str(int(whole))],
                              capture_output=True, text=True, check=True, timeout=600)
        return json.loads(done.stdout)

    streamed, held = run(False), run(True)
    print(f"\npeak extra memory of a process reading {result.tensors_ref.nbytes / 1e6:.0f} MB through the service")
    print(f"  streamed to disk (save_tensors):  {streamed['growth_mb']:7.1f} MB   (target <= 64 MB)")
    print(f"  held whole in memory:             {held['growth_mb']:7.1f} MB")


def session(client, repeats: int) -> None:
    from tpm_fed.interventions import Add, FromSaved, Reduce, Save, SavedTerm, SessionStep
    from tpm_fed.protocol.tensors import TensorData

    layer, prompt, a, b = "model.layers.1", "The telescope observed the", "the bright sky", "the dark sky"
    save = Save(point=layer, name="h", reduce=Reduce(op="mean"))
    steps = [
        SessionStep(name="a", prompts=[a], steps=[save]),
        SessionStep(name="b", prompts=[b], steps=[save]),
        SessionStep(name="steer", prompts=[prompt], max_new_tokens=8, steps=[Add(
            point=layer, generated=True, value_from=FromSaved(terms=[SavedTerm(step="a", save="h", weight=4),
                                                                       SavedTerm(step="b", save="h", weight=-4)]))]),
    ]

    def as_session() -> list[int]:
        return client.session(steps).result().step("steer").completions[0].token_ids

    def as_requests() -> list[int]:
        first = client.trace(a, steps=[save]).result().saved("h")
        second = client.trace(b, steps=[save]).result().saved("h")
        vector = TensorData.of(first * 4 + second * -4)
        return client.trace(prompt, max_new_tokens=8, steps=[Add(point=layer, generated=True, value=vector)]
                            ).result().completions[0].token_ids

    assert as_session() == as_requests(), "the session and the separate requests disagree"
    times: dict[str, list[float]] = {"session": [], "requests": []}
    for index in range(repeats):
        log(f"  repeat {index + 1}/{repeats}")
        for name, run in (("requests", as_requests), ("session", as_session)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(samples) for name, samples in times.items()}
    print(f"\n3-step steering (median of {repeats}, warm replica, through the service)")
    print(f"  three separate requests: {median['requests'] * 1000:8.1f} ms")
    print(f"  one session:             {median['session'] * 1000:8.1f} ms  "
          f"{median['requests'] / median['session']:5.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="fetch,memory,session")
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a trained demo model folder to copy (default: train one, ~15 s on an idle machine)")
    args = parser.parse_args()
    only = set(args.only.split(","))

    from tpm_fed.client import Client

    print(f"bench_references: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-refs-") as scratch:
        scratch = Path(scratch)
        model_dir = demo_model(scratch / "demo", args.demo_dir)
        home = bench_home(scratch / "home", model_dir, backend="torch", kinds=("generate", "trace"))
        with tpm_serve(home) as (url, headers):
            token = headers["Authorization"].split()[1]
            client = Client(url, token)
            if only & {"fetch", "memory"}:
                log("a large trace, left by reference...")
                result = big_trace(client, args.megabytes)
                if "fetch" in only:
                    fetch(client, result, scratch, args.repeats)
                if "memory" in only:
                    memory(url, token, result, scratch)
            if "session" in only:
                log("sessions vs separate requests...")
                session(client, args.repeats)
            client.close()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
