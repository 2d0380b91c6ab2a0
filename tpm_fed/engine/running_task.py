"""A task running on a replica: the requests it carries, and who settles each of them, once.

A task is closed exactly once, by its answer or by its timeout; each of its
requests, sent with it or joined while it ran, is settled exactly once: by an
early answer on the back channel, or by whoever closed the task
(:meth:`RunningTask.claim_unanswered`). Every method is called under the
dispatcher's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tpm_fed.engine.clock import Timed, now
from tpm_fed.engine.pending import Pending


@dataclass
class RunningTask:
    """One task's requests: ``pending`` sent with it, others joined while it ran; ``joinable`` while its
    worker may take more in.

    A task now lives on while requests keep coming (the worker's idle wait), so one may serve thousands:
    it holds only the requests not settled yet, by id, and lets each go once settled (an early answer
    finds its request without a scan, and what a task holds does not grow with what it served).
    """

    pending: list[Pending]
    closed: bool = False
    timer: Timed | None = None
    joinable: bool = False
    started: float = field(default_factory=now)
    joining: int = 0  # handed over, being reserved
    _unsettled: dict[str, tuple[Pending, bool]] = field(default_factory=dict, init=False, repr=False)  # id: (request, joined?)

    def __post_init__(self) -> None:
        self._unsettled.update((p.request_id, (p, False)) for p in self.pending)

    @property
    def running(self) -> int:
        """Requests the task's engine has now (handed over ones included)."""
        return len(self._unsettled) + self.joining

    @property
    def held(self) -> int:
        """Requests this task holds, not settled yet (handed over ones not counted)."""
        return len(self._unsettled)

    def join(self, joined: list[Pending]) -> None:
        """``joined`` (reserved) now run on the task too."""
        self._unsettled.update((p.request_id, (p, True)) for p in joined)

    def close(self) -> bool:
        """Claim the task for whoever ends it first (its answer or its timeout): True once."""
        if self.closed:
            return False
        self.closed, self.joinable = True, False
        if self.timer is not None:
            self.timer.cancel()
        return True

    def claim_answered(self, request_ids: list[str]) -> list[tuple[Pending, bool]]:
        """The task's requests among ``request_ids`` not settled yet, now claimed (an early answer), each
        with whether it joined the task (``False``: sent with it)."""
        return [claimed for rid in request_ids if (claimed := self._unsettled.pop(rid, None)) is not None]

    def claim_unanswered(self) -> tuple[list[Pending], list[Pending]]:
        """The requests not settled yet (its own, joined), now claimed (the task ended)."""
        own = [p for p, joined in self._unsettled.values() if not joined]
        joined = [p for p, was_joined in self._unsettled.values() if was_joined]
        self._unsettled.clear()
        return own, joined
