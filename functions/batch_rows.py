"""A share of a replica's engine kept for interactive work: at most K batch rows in it at once.

vLLM's priority scheduling (``scheduling_policy="priority"``) puts an
interactive request before waiting batch lines, but it does not pause running
rows for it: the interactive request shares every step with the batch rows
already running. Where a step's time grows with its rows (on CPU: about 5 ms
for one row of the demo model, 35 ms for 65), that sharing is most of its
latency. So a worker may cap the batch rows its engine holds (the endpoint's
``TPM_BATCH_ROWS``, :mod:`functions.policy`): the task's other batch
requests wait here, in order, and enter as batch rows end. Interactive rows
always enter at once. Default: no cap, since on a GPU a step's time barely
grows with its rows, and a cap would cost batch throughput for nothing.

A held request stays the task's: it is answered exactly once, when its rows
end in the engine, or at once with nothing made if its caller leaves while it
waits (the same answer a streamed row gets when its caller leaves mid-way).

A static cap keeps batch rows out even when no interactive request is there.
So a worker may instead (or as well) yield while interactive rows run: at most
``beside_interactive`` batch rows stay in the engine beside them
(``TPM_BATCH_ROWS_BESIDE_INTERACTIVE``; 0: none). The newest batch rows beyond
it are *set aside*: taken out of the engine with the tokens they made so far,
and put back first in line. When the interactive rows end, they re-enter with
their prompt and those tokens as the new prompt (prefilled again, but for
the full KV blocks vLLM's prefix cache still holds) for the tokens still to make, and their answer is the two parts
joined. Only a request whose continuation is the same computation may be set
aside (:func:`resumable`): greedy or unseeded, no stop strings (a stop string
could straddle the join), not streamed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from tpm_fed.protocol.generation import BATCH_PRIORITY, CALLER_PRIORITY_BOUND
from tpm_fed.protocol.requests import GenerationRequest

Row = TypeVar("Row")


def is_batch_line(priority: int) -> bool:
    """Whether a request of this priority is a batch line: its caller's priority plus
    :data:`BATCH_PRIORITY` (a caller's own priority is always below :data:`CALLER_PRIORITY_BOUND`)."""
    return priority >= BATCH_PRIORITY - CALLER_PRIORITY_BOUND + 1


def resumable(request: GenerationRequest) -> bool:
    """Whether a batch line's rows may leave the engine mid-way and resume from prompt + tokens so far
    with the same result: the next tokens depend only on those (greedy, or sampled with no seed to
    replay: vLLM seeds a generator per request, so a seeded row would draw differently once resumed),
    its stop strings cannot straddle the join (it has none), and nobody reads it as it is made."""
    return (is_batch_line(request.priority) and not request.stream and not request.stop
            and (request.seed is None or request.temperature == 0))


class BatchRows(Generic[Row]):
    """The batch rows one task lets into its engine: at most ``cap`` at once, and at most
    ``beside_interactive`` while interactive rows are in it; what does not fit waits here.

    Args:
        cap: The most batch rows in the engine at once; None: no cap.
        rows_of: How many engine rows a request holds now (one per prompt not yet done).
        is_batch: Whether a request is a batch line (an interactive one is never held).
        beside_interactive: The most batch rows in the engine while an interactive row is in it (the
            rest are set aside, :meth:`set_aside`); None: interactive rows change nothing.
        resumable: Whether a batch request may be set aside (:func:`resumable`).
    """

    def __init__(self, cap: int | None, rows_of: Callable[[Row], int], is_batch: Callable[[Row], bool],
                 beside_interactive: int | None = None, resumable: Callable[[Row], bool] = lambda _: False) -> None:
        self.cap = cap
        self.beside_interactive = beside_interactive
        self._rows_of = rows_of
        self._is_batch = is_batch
        self._resumable = resumable
        self._held: deque[Row] = deque()
        # Batch requests in the engine by id() (a request need not be hashable), oldest first.
        self._entered: dict[int, Row] = {}
        self.in_engine = 0  # batch rows in the engine now (counted when there is a limit)
        self.interactive = 0  # interactive rows in the engine now (likewise)

    @property
    def held(self) -> int:
        """Requests waiting for room."""
        return len(self._held)

    @property
    def _counting(self) -> bool:
        return self.cap is not None or self.beside_interactive is not None

    def _limit(self) -> int | None:
        if self.interactive and self.beside_interactive is not None:
            return self.beside_interactive if self.cap is None else min(self.cap, self.beside_interactive)
        return self.cap

    def enter(self, request: Row) -> bool:
        """Whether ``request`` enters the engine now (its rows counted); if not, it waits its turn here."""
        if not self._is_batch(request):
            if self._counting:
                self.interactive += self._rows_of(request)
            return True
        if not self._counting or (not self._held and self._fits(request)):
            self._count_in(request)
            return True
        self._held.append(request)
        return False

    def row_ended(self, request: Row) -> None:
        """One of ``request``'s rows left the engine (finished, or stopped because its caller left);
        call it once the row is marked done, so :attr:`rows_of` no longer counts it."""
        if not self._counting:
            return
        if not self._is_batch(request):
            self.interactive -= 1
            return
        self.in_engine -= 1
        if not self._rows_of(request):
            self._entered.pop(id(request), None)

    def ready(self) -> list[Row]:
        """Held requests that fit now, in the order they came (counted as in the engine)."""
        ready = []
        while self._held and self._fits(self._held[0]):
            request = self._held.popleft()
            self._count_in(request)
            ready.append(request)
        return ready

    def set_aside(self) -> list[Row]:
        """While interactive rows run, the newest resumable batch requests beyond
        ``beside_interactive``: no longer counted as in the engine, first in line again (in the order
        they came). The caller takes their rows out of the engine, keeping what they made."""
        limit = self._limit()
        if not self.interactive or limit is None or self.in_engine <= limit:
            return []
        aside = []
        for request in reversed(list(self._entered.values())):
            if self.in_engine <= limit:
                break
            if self._resumable(request):
                del self._entered[id(request)]
                self.in_engine -= self._rows_of(request)
                aside.append(request)
        self._held.extendleft(aside)  # the newest was taken first: extendleft puts the oldest in front
        return aside

    def withdraw(self, leaving: Callable[[Row], bool]) -> list[Row]:
        """Take out the held requests ``leaving`` picks (their callers left): they never enter."""
        gone = [request for request in self._held if leaving(request)]
        if gone:
            self._held = deque(request for request in self._held if not leaving(request))
        return gone

    def _count_in(self, request: Row) -> None:
        if self._counting:
            self.in_engine += self._rows_of(request)
            self._entered[id(request)] = request

    def _fits(self, request: Row) -> bool:
        # A request with more rows than the limit enters alone, when no other batch row is in (a
        # limit of 0 lets none in: every batch row waits for the interactive ones to end).
        limit = self._limit()
        if limit is None:
            return True
        return (self.in_engine == 0 and limit > 0) or self.in_engine + self._rows_of(request) <= limit
