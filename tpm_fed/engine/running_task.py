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
    """One task's requests: ``pending`` sent with it, ``joined`` while it ran, ``answered`` (of either)
    already settled; ``joinable`` while its worker may take more in."""

    pending: list[Pending]
    closed: bool = False
    timer: Timed | None = None
    joinable: bool = False
    started: float = field(default_factory=now)
    joined: list[Pending] = field(default_factory=list)
    joining: int = 0  # handed over, being reserved
    answered: set[str] = field(default_factory=set)

    @property
    def running(self) -> int:
        """Requests the task's engine has now (handed over ones included)."""
        return len(self.pending) + len(self.joined) + self.joining - len(self.answered)

    def close(self) -> bool:
        """Claim the task for whoever ends it first (its answer or its timeout): True once."""
        if self.closed:
            return False
        self.closed, self.joinable = True, False
        if self.timer is not None:
            self.timer.cancel()
        return True

    def claim_answered(self, request_ids: list[str]) -> list[Pending]:
        """The task's requests among ``request_ids`` not settled yet, now claimed (an early answer)."""
        fresh = [p for rid in dict.fromkeys(request_ids) if rid not in self.answered
                 and (p := self._member(rid)) is not None]
        self.answered.update(p.request_id for p in fresh)
        return fresh

    def claim_unanswered(self) -> tuple[list[Pending], list[Pending]]:
        """The requests not settled yet (its own, joined), now claimed (the task ended)."""
        own = [p for p in self.pending if p.request_id not in self.answered]
        joined = [p for p in self.joined if p.request_id not in self.answered]
        self.answered.update(p.request_id for p in (*own, *joined))
        return own, joined

    def is_joined(self, pending: Pending) -> bool:
        return any(p is pending for p in self.joined)

    def _member(self, request_id: str) -> Pending | None:
        return next((p for p in (*self.pending, *self.joined) if p.request_id == request_id), None)
