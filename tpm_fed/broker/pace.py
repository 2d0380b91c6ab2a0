"""How fast a replica generates, by how many rows it runs at once: the time model behind a batch's quote.

A replica's time per generation step grows with the rows (sequences) it
runs together: ``step_s(rows) = fixed_s + per_row_s * rows``. Both terms are
fit, per replica, to what its tasks took (a task of ``rows`` requests whose
longest made ``steps`` tokens in ``run_s``: ``run_s / steps`` per step), by
least squares with old observations fading (the replica may change load),
so a quote for a large batch is not read off a small task's pace.

Until a replica has served tasks of two different sizes, its per-row term is
unknown; the fit then assumes half of a step is per row, which errs on the
slow side for large batches on an accelerator (whose steps barely grow) and
is about right on CPUs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

FADE = 0.9
"""Weight an observation keeps each time a newer one arrives."""


class StepModel:
    """Seconds per generation step as a line in the rows run together; observed, then asked."""

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weight, rows, step_s, rows², rows x step_s (all faded)
        self._lock = threading.Lock()

    def observe(self, rows: int, steps: int, run_s: float) -> None:
        """A task of ``rows`` requests ran ``steps`` steps (its longest output) in ``run_s`` seconds."""
        if rows < 1 or steps < 1 or not run_s > 0:
            return
        step_s = run_s / steps
        with self._lock:
            self._sums = [FADE * total + value for total, value in
                          zip(self._sums, (1.0, rows, step_s, rows * rows, rows * step_s), strict=True)]

    @property
    def known(self) -> bool:
        return self._sums[0] > 0

    def step_s(self, rows: int) -> float:
        """Expected seconds of one step over ``rows`` rows (0 if nothing was observed)."""
        with self._lock:
            weight, x, y, xx, xy = self._sums
        if weight == 0:
            return 0.0
        mean_x, mean_y = x / weight, y / weight
        spread = xx / weight - mean_x * mean_x
        if spread > 1e-9 * max(1.0, mean_x * mean_x):
            per_row = max(0.0, (xy / weight - mean_x * mean_y) / spread)
            fixed = max(0.0, mean_y - per_row * mean_x)
        else:  # one task size seen so far: half of a step fixed, half per row
            fixed, per_row = mean_y / 2, mean_y / 2 / mean_x
        return fixed + per_row * rows

    def batch_s(self, steps: Sequence[int], rows: int) -> float:
        """Seconds to run requests of ``steps`` generation steps each, ``rows`` at a time in their order
        (each wave as long as its longest request)."""
        rows = max(1, rows)
        total = 0.0
        for start in range(0, len(steps), rows):
            wave = steps[start:start + rows]
            total += max(wave) * self.step_s(len(wave))
        return total
