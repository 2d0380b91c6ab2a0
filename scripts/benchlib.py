"""Helpers shared by the benchmark scripts: prompts, progress, interleaved timing."""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

PROMPTS = [
    "The cell",
    "The climate model runs on many nodes",
    "A scientist can reproduce a result when",
    "The river carries sediment",
    "The detector counts",
    "The galaxy contains",
    "An allocation is counted",
    "The experiment was repeated",
]


def log(message: str) -> None:
    """Progress goes to stderr; stdout holds only the figures."""
    print(message, file=sys.stderr, flush=True)


def interleaved(repeats: int, *runs) -> list[list[tuple[float, int]]]:
    """Every repeat of each run, taken in turn so drift hits all alike.

    Each run returns how many tokens it generated.

    Returns:
        Per run, (seconds, tokens generated) of each repeat, in order.
    """
    timings: list[list[tuple[float, int]]] = [[] for _ in runs]
    for index in range(repeats):
        log(f"  repeat {index + 1}/{repeats}")
        for run, samples in zip(runs, timings):
            started = time.perf_counter()
            tokens = run()
            samples.append((time.perf_counter() - started, tokens))
    return timings


def paired_ratios(baseline: list[tuple[float, int]], other: list[tuple[float, int]]) -> list[float]:
    """Throughput of ``other`` over ``baseline``, repeat by repeat (each pair ran back to back)."""
    return [(t / s) / (bt / bs) for (bs, bt), (s, t) in zip(baseline, other)]


Share = tuple[int | None, int | None, int | None]
"""How a replica's engine shares its steps with batch rows: the sites' ``worker.batch_rows``,
``batch_rows_beside_interactive`` and ``batch_tokens_after_interactive`` (None: unset)."""


def share_of(spec: str) -> Share:
    """``CAP[:K[:T]]`` -> (the cap on batch rows, the batch rows kept beside an interactive one, the tokens a
    step gives batch rows just after one); ``none``: unset."""
    cap, beside, after = (spec.split(":") + ["none", "none"])[:3]
    return tuple(None if part in ("none", "") else int(part) for part in (cap, beside, after))


def share_engine(home, share: Share, max_batch: int | None = None) -> None:
    """Set the home's sites' share of their engines with batch rows (``share``, from :func:`share_of`), and
    with ``max_batch`` their task size (``max_batch_requests``)."""
    import yaml

    from tpm_fed.federation import Federation

    federation = Federation.model_validate(yaml.safe_load(home.federation_file.read_text()))
    sizes = {} if max_batch is None else {"max_batch_requests": max_batch}
    sites = [site.model_copy(update={**sizes, "worker": site.worker.model_copy(update={
        "batch_rows": share[0], "batch_rows_beside_interactive": share[1],
        "batch_tokens_after_interactive": share[2]})}) for site in federation.sites]
    federation.model_copy(update={"sites": sites}).dump(home.federation_file)


def described(share: Share) -> str:
    """How a vLLM worker shares its engine with batch rows, in words."""
    cap, beside, after = share
    said = "no cap on batch rows" if cap is None else f"at most {cap} batch rows in the engine"
    if beside is None:
        said += ", batch rows paused beside an interactive one as the engine's default (all, on a CPU)"
    else:
        said += f", at most {beside} stepped beside an interactive one (the rest paused)"
    if after is None:
        return said + ", steps just after one as short as the engine's default (16 tokens, on a CPU)"
    return said + f", at most {after} tokens a step just after one"


def py_spy() -> str | None:
    """py-spy's executable (``pip install -e ".[bench]"``): on PATH, or beside this interpreter when its venv
    is not on PATH (a script run as ``.venv/bin/python scripts/...``); None where neither has it."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def machine() -> str:
    """When and on what a benchmark ran: date, CPU count, load average (others may share the machine)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, load average {load}"


def demo_model(target: Path, copy_from: Path | None = None) -> Path:
    """The demo model at ``target``: a copy of ``copy_from`` (a scripts' ``--demo-dir``), else trained there."""
    if copy_from is not None:
        shutil.copytree(copy_from, target)
    else:
        from tpm_fed.models.demo import make_demo_model

        log("making the demo model...")
        make_demo_model(target, progress=False)
    return target
