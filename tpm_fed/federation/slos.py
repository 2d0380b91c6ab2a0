"""The service level objectives the operator promises, per request kind."""

from __future__ import annotations

from pydantic import Field

from tpm_fed.federation.base import _Strict


class SloTarget(_Strict):
    """What the operator promises for one request kind, over the SLO window."""

    p95_latency_s: float = Field(gt=0)
    availability: float = Field(default=0.99, gt=0, le=1)


class Slos(_Strict):
    """Service level objectives: targets per request kind, judged over a sliding window.

    Attributes:
        window_s: The window the service reports p50/p95 and availability over.
        generate, embed, trace, session, encode: The target for that kind (none: reported, not judged).
    """

    window_s: float = Field(default=3600.0, gt=0, le=30 * 86400)
    generate: SloTarget | None = None
    embed: SloTarget | None = None
    trace: SloTarget | None = None
    session: SloTarget | None = None
    encode: SloTarget | None = None
