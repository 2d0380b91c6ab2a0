"""Batches: one file of chat completions through tpm-fed's batch API vs vLLM's own offline batch runner.

Chat completions, not plain completions: vLLM's ``run_batch`` (0.32) takes
``/v1/chat/completions`` lines but no ``/v1/completions`` ones. The demo
model gets a chat template (the tests' own) so both sides render the same
prompt. The same JSONL file (N lines, greedy, exact lengths via
``min_tokens`` = ``max_tokens``, mixed lengths by default) is run

* by ``tpm serve`` (its replica on the vLLM backend, in its own process):
  upload, ``POST /v1/batches``, poll until completed; timed from the upload
  to the batch's end, with the replica already warm (a one-line warm-up batch
  runs first);
* by ``python -m vllm.entrypoints.openai.run_batch`` on the same model
  directory: one process that loads the model, runs the file and writes the
  results. Its wall time includes starting and loading, so a one-line file is
  run too, and its time subtracted, for vLLM's running time alone.

Completion tokens are counted from each side's output file. Printed: tok/s
each way and the ratio tpm-fed / vLLM, against vLLM's running time alone
(the fair figure) and against its whole wall time.

Usage:
    python scripts/bench_batch.py [--lines 256] [--lengths 12,32,64,128,192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PROMPTS, log, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_service import bench_home, tpm_serve


def batch_file(path: Path, lines: int, lengths: list[int]) -> Path:
    with path.open("w") as out:
        for index in range(lines):
            tokens = lengths[index % len(lengths)]
            body = {"model": "model", "messages": [{"role": "user", "content": f"{PROMPTS[index % len(PROMPTS)]}"
                                                                               f" {index}"}],
                    "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
            out.write(json.dumps({"custom_id": f"line-{index}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")
    return path


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The tests' chat template (tests/conftest.py), so the demo model can answer chat lines."""


def with_chat_template(model_dir: Path) -> Path:
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return model_dir


def completion_tokens(output_lines: list[dict]) -> int:
    total = 0
    for line in output_lines:
        response = line.get("response") or {}
        if response.get("status_code") != 200:
            raise SystemExit(f"a line failed: {json.dumps(line)[:500]}")
        total += response["body"]["usage"]["completion_tokens"]
    return total


def run_vllm(model_dir: Path, source: Path, scratch: Path) -> tuple[float, int]:
    """vLLM's offline batch runner on ``source``: (wall seconds, completion tokens)."""
    output = scratch / f"vllm-{source.stem}-out.jsonl"
    log_file = scratch / "vllm-run-batch.log"
    started = time.perf_counter()
    with log_file.open("ab") as log_out:
        done = subprocess.run(
            [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(output),
             "--model", str(model_dir), "--served-model-name", "model", "--dtype", "float32", "--enforce-eager",
             "--seed", "0"],
            check=False, stdout=log_out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit("vLLM's run_batch failed:\n" + "\n".join(log_file.read_text().splitlines()[-20:]))
    lines = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    return seconds, completion_tokens(lines)


PHASES: list[tuple[float, float, float]] = []
"""Per tpm-fed run: seconds to upload (every line checked), to create (every line quoted), to run."""


def run_tpm(url: str, headers: dict[str, str], source: Path) -> tuple[float, int]:
    """tpm-fed's batch API on ``source``: (seconds from upload to the batch's end, completion tokens)."""
    import httpx

    with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
        started = time.perf_counter()
        uploaded = http.post("/v1/files", files={"file": (source.name, source.read_bytes())},
                             data={"purpose": "batch"})
        uploaded.raise_for_status()
        checked = time.perf_counter()
        created = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                 "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        created.raise_for_status()
        quoted = time.perf_counter()
        batch_id = created.json()["id"]
        while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] not in ("completed", "cancelled"):
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        PHASES.append((checked - started, quoted - checked, seconds - (quoted - started)))
        if batch["request_counts"]["failed"]:
            raise SystemExit(f"{batch['request_counts']['failed']} lines failed")
        output = http.get(f"/v1/files/{batch['output_file_id']}/content").content
    return seconds, completion_tokens([json.loads(line) for line in output.decode().splitlines() if line.strip()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--lengths", default="12,32,64,128,192", help="completion lengths, cycled over the lines")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tpm_fed.models.demo import make_demo_model

    lengths = [int(n) for n in args.lengths.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="tpm-bench-batch-"))
    try:
        log("making the demo model...")
        model_dir = with_chat_template(make_demo_model(scratch / "demo", progress=False))
        source = batch_file(scratch / "batch.jsonl", args.lines, lengths)
        one_line = batch_file(scratch / "one.jsonl", 1, lengths[:1])
        runs: dict[str, list[tuple[float, int]]] = {"tpm": [], "vllm": [], "vllm-startup": []}
        started_on = machine()
        with tpm_serve(bench_home(scratch / "home", model_dir, "vllm")) as (url, headers):
            log("warming tpm-fed's replica (a one-line batch)...")
            run_tpm(url, headers, one_line)
            for repeat in range(args.repeats):
                log(f"  repeat {repeat + 1}/{args.repeats}")
                runs["vllm-startup"].append(run_vllm(model_dir, one_line, scratch))
                runs["vllm"].append(run_vllm(model_dir, source, scratch))
                runs["tpm"].append(run_tpm(url, headers, source))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    startup = min(seconds for seconds, _ in runs["vllm-startup"])
    tpm = max(tokens / seconds for seconds, tokens in runs["tpm"])
    vllm_wall = max(tokens / seconds for seconds, tokens in runs["vllm"])
    vllm_running = max(tokens / (seconds - startup) for seconds, tokens in runs["vllm"])
    tokens = runs["tpm"][0][1]
    print(f"started {started_on}; ended {machine()}")
    print(f"batch: {args.lines} /v1/chat/completions lines, lengths {lengths} cycled, greedy, {tokens} completion "
          f"tokens; best of {args.repeats}")
    print("runs (seconds): " + "; ".join(f"{name} " + ", ".join(f"{seconds:.2f}" for seconds, _ in samples)
                                         for name, samples in runs.items()))
    print("tpm-fed phases (upload+check, create+quote, run): " + "; ".join(
        f"{up:.2f} + {create:.2f} + {run:.2f} s" for up, create, run in PHASES[1:]))
    print(f"vLLM run_batch, whole process (start, load, run): {vllm_wall:8.0f} tok/s")
    print(f"vLLM run_batch, running only (minus a 1-line run's {startup:.1f} s): {vllm_running:8.0f} tok/s")
    print(f"tpm-fed batch API (warm vLLM replica, upload to end): {tpm:8.0f} tok/s  "
          f"{tpm / vllm_running:5.2f}x vLLM running, {tpm / vllm_wall:5.2f}x vLLM whole")


if __name__ == "__main__":
    main()
