"""A share of a replica's engine kept for interactive work: at most K batch rows in it at once.

vLLM's priority scheduling (``scheduling_policy="priority"``) puts an
interactive request before waiting batch lines, and the engine's scheduler
here pauses running batch rows while interactive rows run
(:mod:`functions.backends.interactive_first`). Their steps are still the
batch's size when no interactive request is there, and an interactive request
that arrives waits for the step in flight: where a step's time grows with its
rows (on a CPU, one thread: 1.8 ms for 8 rows of the demo model, 14.5 ms for 256), that
wait is most of what a running batch adds to its latency. So a worker may
also cap the batch rows its engine holds (the endpoint's ``TPM_BATCH_ROWS``,
:mod:`functions.policy`): the task's other batch requests wait here, in
order, and enter as batch rows end. Interactive rows always enter at once.
Default: no cap, since on a GPU a step's time barely grows with its rows, and
a cap would cost batch throughput for nothing.

A held request stays the task's: it is answered exactly once, when its rows
end in the engine, or at once with nothing made if its caller leaves while it
waits (the same answer a streamed row gets when its caller leaves mid-way).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from tpm_fed.protocol.generation import BATCH_PRIORITY, CALLER_PRIORITY_BOUND

Row = TypeVar("Row")


def is_batch_line(priority: int) -> bool:
    """Whether a request of this priority is a batch line: its caller's priority plus
    :data:`BATCH_PRIORITY` (a caller's own priority is always below :data:`CALLER_PRIORITY_BOUND`)."""
    return priority >= BATCH_PRIORITY - CALLER_PRIORITY_BOUND + 1


class BatchRows(Generic[Row]):
    """The batch rows one task lets into its engine: at most ``cap`` at once; what does not fit waits here.

    Args:
        cap: The most batch rows in the engine at once; None: no cap.
        rows_of: How many engine rows a request holds now (one per prompt not yet done).
        is_batch: Whether a request is a batch line (an interactive one is never held).
    """

    def __init__(self, cap: int | None, rows_of: Callable[[Row], int], is_batch: Callable[[Row], bool]) -> None:
        self.cap = cap
        self._rows_of = rows_of
        self._is_batch = is_batch
        self._held: deque[Row] = deque()
        self.in_engine = 0  # batch rows in the engine now (counted when there is a cap)

    @property
    def held(self) -> int:
        """Requests waiting for room."""
        return len(self._held)

    def enter(self, request: Row) -> bool:
        """Whether ``request`` enters the engine now (its rows counted); if not, it waits its turn here."""
        if not self._is_batch(request) or self.cap is None:
            return True
        if not self._held and self._fits(request):
            self.in_engine += self._rows_of(request)
            return True
        self._held.append(request)
        return False

    def row_ended(self, request: Row) -> None:
        """One of ``request``'s rows left the engine (finished, or stopped because its caller left)."""
        if self.cap is not None and self._is_batch(request):
            self.in_engine -= 1

    def ready(self) -> list[Row]:
        """Held requests that fit now, in the order they came (counted as in the engine)."""
        ready = []
        while self._held and self._fits(self._held[0]):
            request = self._held.popleft()
            self.in_engine += self._rows_of(request)
            ready.append(request)
        return ready

    def withdraw(self, leaving: Callable[[Row], bool]) -> list[Row]:
        """Take out the held requests ``leaving`` picks (their callers left): they never enter."""
        gone = [request for request in self._held if leaving(request)]
        if gone:
            self._held = deque(request for request in self._held if not leaving(request))
        return gone

    def _fits(self, request: Row) -> bool:
        # A request with more rows than the cap enters alone, when no other batch row is in.
        return self.in_engine == 0 or self.in_engine + self._rows_of(request) <= self.cap
