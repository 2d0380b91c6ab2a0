"""vLLM's scheduler, with batch rows paused while interactive rows run, and short batch steps just after.

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
batch line still waiting is not admitted meanwhile either.

What is left of a running batch's cost is the step in flight when the
interactive request arrives: it waits for that one, and a step that prefills
a task's new lines is long (on the demo model on a CPU, up to 60 ms against
5 ms for 64 decode rows). So for :data:`RECENT_S` after an interactive row
was in the engine, a step gives the batch rows at most ``tokens_after``
tokens (vLLM leaves the rows beyond its token budget out of a step, as
above, and prefills a long prompt in chunks; where chunked prefill is off,
steps are not shortened): the next interactive request waits for a short
step. The batch runs at 0.4-0.8x its rate while
interactive requests keep coming (docs/performance.md), and at its full rate
a second after the last: interactive first. (A cap on batch rows,
:mod:`functions.batch_rows`, makes every batch step shorter, at the batch's
expense all the time.)

By default a replica on a CPU pauses every batch row (:data:`ON_CPU`) and
keeps its steps to 16 tokens after an interactive row
(:data:`TOKENS_AFTER_ON_CPU`); one on a GPU does neither: there a step's
time barely grows with its rows, so it would cost the batch for nothing. A
site's ``worker.batch_rows_beside_interactive``
(``TPM_BATCH_ROWS_BESIDE_INTERACTIVE``) and
``worker.batch_tokens_after_interactive``
(``TPM_BATCH_TOKENS_AFTER_INTERACTIVE``) set them either way; one above the
engine's ``max_num_seqs`` (``max_num_batched_tokens``) does nothing.

A batch row sits out at most :data:`MOST_STEPS_PAUSED` steps in a row; the
next one takes every row, so a steady stream of interactive requests slows
a batch (to at least one step in that many) but never stops it, and its
task still ends inside the site's ``task_timeout_s``.

It pauses nothing when the KV cache is nearly full (paused rows hold blocks
the interactive rows may need, and vLLM's preemption, which frees them, is
then the better tool), and it is plain vLLM when no interactive row has been
there for :data:`RECENT_S`.

A batch line is a request whose priority is :data:`BATCH_PRIORITY` above its
caller's (:func:`functions.batch_rows.is_batch_line`). The worker names this
class as the engine's ``scheduler_cls`` (:mod:`functions.backends.vllm_backend`);
both numbers are read from the endpoint's policy when the engine starts.
"""

from __future__ import annotations

import time
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

TOKENS_AFTER_ON_CPU = 16
"""Tokens a CPU step gives batch rows for :data:`RECENT_S` after an interactive row, unless the site says
otherwise: a demo-model step of 16 decode rows takes 2 ms, of 64 rows 4-5 ms, one with a 2,048-token
prefill up to 60 ms. Through the service, an interactive request beside a batch met its 1.5x target in
nearly every run with 16, in about half with 64 (docs/performance.md). On a GPU there is no limit unless the
site says so."""

RECENT_S = 1.0
"""How long after an interactive row left the engine its steps stay short (:data:`TOKENS_AFTER_ON_CPU`)."""


class InteractiveFirst(Scheduler):
    """:class:`vllm.v1.core.sched.scheduler.Scheduler`, pausing batch rows beyond ``paused_beyond`` while
    an interactive row is in the engine, and giving batch rows at most ``tokens_after`` tokens a step
    for :data:`RECENT_S` after one (None: never)."""

    paused_beyond: int | None = None
    tokens_after: int | None = None
    most_steps_paused = MOST_STEPS_PAUSED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from functions.policy import current_policy

        # Only under vLLM's priority policy do interactive requests come first in its waiting queue.
        if self.policy == SchedulingPolicy.PRIORITY:
            policy = current_policy()
            self.paused_beyond = paused_beyond(policy.batch_rows_beside_interactive)
            # Without chunked prefill, a prompt longer than the short budget would wait for a second free
            # of interactive requests, which a steady stream of them never leaves.
            if self.scheduler_config.enable_chunked_prefill:
                self.tokens_after = tokens_after(policy.batch_tokens_after_interactive)
        self._steps_paused = 0  # in a row, up to the last step
        self._interactive_at = float("-inf")  # when an interactive row was last in the engine (monotonic)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if (self.paused_beyond is None and self.tokens_after is None) or self.kv_cache_manager.usage > FULL_CACHE:
            return super().schedule(*args, **kwargs)
        waiting = self._interactive_waiting()
        if waiting or not all(is_batch_line(request.priority) for request in self.running):
            self._interactive_at = time.monotonic()
            if self.paused_beyond is None:
                return super().schedule(*args, **kwargs)
            return self._beside_interactive(waiting, args, kwargs)
        self._steps_paused = 0
        if self.tokens_after is None or time.monotonic() - self._interactive_at > RECENT_S:
            return super().schedule(*args, **kwargs)
        # Only batch rows, but an interactive request may come any moment: keep the step short, for it
        # waits for the step in flight. vLLM leaves the rows beyond the budget out of this step.
        budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = min(budget, self.tokens_after)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget

    def _beside_interactive(self, waiting: int, args: tuple, kwargs: dict) -> Any:
        """A step with an interactive row running or ``waiting``: the batch rows beyond
        :attr:`paused_beyond` sit it out."""
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
    return _site_or_cpu_default(configured, ON_CPU)


def tokens_after(configured: int | None) -> int | None:
    """The most tokens a replica's step gives batch rows just after an interactive one: the site's
    number, or by default :data:`TOKENS_AFTER_ON_CPU` on a CPU and no limit on a GPU (None)."""
    return _site_or_cpu_default(configured, TOKENS_AFTER_ON_CPU)


def _site_or_cpu_default(configured: int | None, on_cpu: int) -> int | None:
    """``configured`` if the site set it; else ``on_cpu`` on a CPU, where a step's time grows with its rows,
    and None (vLLM's own scheduling) on a GPU, where it barely does."""
    if configured is not None:
        return configured
    from vllm.platforms import current_platform

    return on_cpu if current_platform.is_cpu() else None
