"""vLLM's scheduler, with batch rows paused while interactive rows run.

vLLM's priority policy puts an interactive request ahead of *waiting* batch
lines, but the batch rows already running still share every step with it.
Where a step's time grows with its rows (on a CPU, one thread: a decode step
of the demo model takes 1.8 ms with 8 rows, 14.5 ms with 256), that sharing
is most of the interactive request's latency.

This scheduler keeps at most ``paused_beyond`` batch rows (the oldest) in a
step while any interactive row is running or waiting: the others stay in
vLLM's running list with their KV cache, and are simply not scheduled (vLLM's own scheduler
leaves running rows out of a step whenever its token budget runs out, and its
model runner keeps their state for the step that takes them up again). They
are neither aborted nor prefilled again, so a paused row's tokens are the
same computation; they resume in the first step with no interactive row. A
batch line still waiting is not admitted meanwhile either. What is left of
a running batch's cost is the step in flight when the interactive request
arrives: it waits for that one (a cap on batch rows, :mod:`functions.batch_rows`,
makes those steps shorter, at the batch's expense).

By default a replica on a CPU pauses every batch row (:data:`ON_CPU`), and
one on a GPU none: there a step's time barely grows with its rows, so pausing
would cost the batch for nothing. A site's
``worker.batch_rows_beside_interactive`` (``TPM_BATCH_ROWS_BESIDE_INTERACTIVE``)
sets the number either way; one above the engine's ``max_num_seqs`` pauses
nothing.

A batch row sits out at most :data:`MOST_STEPS_PAUSED` steps in a row; the
next one takes every row, so a steady stream of interactive requests slows
a batch (to at least one step in that many) but never stops it, and its
task still ends inside the site's ``task_timeout_s``.

It pauses nothing when the KV cache is nearly full (paused rows hold blocks
the interactive rows may need, and vLLM's preemption, which frees them, is
then the better tool), and it is plain vLLM when no interactive row is there.

A batch line is a request whose priority is :data:`BATCH_PRIORITY` above its
caller's (:func:`functions.batch_rows.is_batch_line`). The worker names this
class as the engine's ``scheduler_cls`` (:mod:`functions.backends.vllm_backend`);
the number is read from the endpoint's policy when the engine starts.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler

from functions.batch_rows import is_batch_line

ON_CPU = 0
"""Batch rows kept beside interactive ones on a CPU unless the site says otherwise: none (a CPU step's
time grows with its rows). On a GPU a step's time barely grows with its rows: nothing is paused there
unless the site says so."""

MOST_STEPS_PAUSED = 16
"""Steps in a row the batch rows may sit out; then one step takes them all."""

FULL_CACHE = 0.9
"""KV cache use above which nothing is paused (the paused rows' blocks may be needed)."""


class InteractiveFirst(Scheduler):
    """:class:`vllm.v1.core.sched.scheduler.Scheduler`, pausing batch rows beyond ``paused_beyond`` while
    an interactive row is in the engine (None: never)."""

    paused_beyond: int | None = None
    most_steps_paused = MOST_STEPS_PAUSED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from functions.policy import current_policy

        # Only under vLLM's priority policy do interactive requests come first in its waiting queue.
        priority = self.policy == SchedulingPolicy.PRIORITY
        self.paused_beyond = paused_beyond(current_policy().batch_rows_beside_interactive) if priority else None
        self._steps_paused = 0  # in a row, up to the last step

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.paused_beyond is None or self.kv_cache_manager.usage > FULL_CACHE:
            return super().schedule(*args, **kwargs)
        waiting = self._interactive_waiting()
        if not waiting and all(is_batch_line(request.priority) for request in self.running):
            self._steps_paused = 0
            return super().schedule(*args, **kwargs)
        if self._steps_paused >= self.most_steps_paused:  # the batch's turn: this step takes every row
            self._steps_paused = 0
            return super().schedule(*args, **kwargs)
        running, paused, kept = [], [], 0
        for request in self.running:
            if is_batch_line(request.priority):
                if kept >= self.paused_beyond:
                    paused.append(request)
                    continue
                kept += 1
            running.append(request)
        admitting = self.max_num_active_reqs
        batch_waiting = len(self.waiting) > waiting
        self._steps_paused = self._steps_paused + 1 if paused or batch_waiting else 0
        self.running = running
        # Waiting batch lines are admitted only into what is left of the share (they wait behind every
        # interactive request: the policy is vLLM's priority order).
        self.max_num_active_reqs = min(admitting, len(running) + waiting + self.paused_beyond - kept)
        try:
            return super().schedule(*args, **kwargs)
        finally:  # back in line: only this step passed them by
            self.max_num_active_reqs = admitting
            self.running.extend(paused)

    def _interactive_waiting(self) -> int:
        """Interactive requests waiting (they come first in vLLM's priority order)."""
        count = 0
        for request in self.waiting:
            if is_batch_line(request.priority):
                break
            count += 1
        return count


def paused_beyond(configured: int | None) -> int | None:
    """The batch rows a replica keeps in a step beside interactive ones: the site's number, or by default
    :data:`ON_CPU` on a CPU and no pause on a GPU (None)."""
    if configured is not None:
        return configured
    from vllm.platforms import current_platform

    return ON_CPU if current_platform.is_cpu() else None
