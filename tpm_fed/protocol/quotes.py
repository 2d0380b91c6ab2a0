"""A quote: what a request would cost at most, and when it would be done, before anything runs.

The broker prices a request from the same decision it would act on
(:meth:`tpm_fed.broker.Broker.quote`); nothing is reserved, started or run.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Quote(BaseModel):
    """What the broker would do with a request, priced.

    Attributes:
        max_su: The charge never exceeds this: the usage bound at the kind's
            prices, plus a cold start (the quoted replica may be gone by the
            time the request is sent), or 0 on the project's own site.
        expected_su: The same bound for the placement chosen now (a cold start
            only when it starts a replica).
        estimated_s: Seconds until the answer, by the broker's own model:
            queue ahead, the replica's measured service time, the network,
            and the site's cold start when a replica must start.
        replica: The warm replica it would use, or None for a new one.
        nodes: Nodes that replica holds; the prices count every one (a cold start per
            node, node time on each).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    project: str
    model: str
    version: str
    kind: str
    site: str
    replica: str | None
    nodes: int = 1
    cold: bool
    free: bool
    max_su: float
    expected_su: float
    estimated_s: float
    explanation: str

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)
