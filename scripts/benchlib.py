"""Helpers shared by the benchmark scripts: prompts, progress, interleaved timing."""

from __future__ import annotations

import sys
import time

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


def best_of_interleaved(repeats: int, *runs) -> list[tuple[float, int]]:
    """Fastest of ``repeats`` runs of each, taken in turn so drift hits all alike.

    Each run returns how many tokens it generated.

    Returns:
        (seconds, tokens generated) of each run's fastest repeat.
    """
    timings: list[list[tuple[float, int]]] = [[] for _ in runs]
    for index in range(repeats):
        log(f"  repeat {index + 1}/{repeats}")
        for run, samples in zip(runs, timings):
            started = time.perf_counter()
            tokens = run()
            samples.append((time.perf_counter() - started, tokens))
    return [min(samples) for samples in timings]
