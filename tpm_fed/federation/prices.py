"""What each kind of request costs, in service units."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from tpm_fed.federation.base import _Strict
from tpm_fed.protocol.kinds import KINDS, RENAMED_KINDS


class Price(_Strict):
    """Service units charged for one kind of request.

    Attributes:
        per_cold_start: Per node started: a replica over N nodes pays N starts.
        per_node_hour: Per hour of replica time the request used, on every node the
            replica holds (its share of the task's load and run time when batched).
    """

    per_1k_prompt_tokens: float = Field(default=0.0, ge=0)
    per_1k_completion_tokens: float = Field(default=0.0, ge=0)
    per_mb_activations: float = Field(default=0.0, ge=0)
    per_cold_start: float = Field(default=0.0, ge=0)
    per_node_hour: float = Field(default=0.0, ge=0)


class Prices(_Strict):
    """The price of each request kind (the rows of :data:`tpm_fed.protocol.kinds.KINDS`; a session pays as traces)."""

    generate: Price = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5)
    embed: Price = Price(per_1k_prompt_tokens=1.0, per_1k_completion_tokens=2.0, per_cold_start=0.5)
    trace: Price = Price(
        per_1k_prompt_tokens=2.0, per_1k_completion_tokens=4.0, per_mb_activations=1.0, per_cold_start=0.5
    )
    # An encoder is small (22 M parameters for MiniLM) and reads each token once: a tenth of generate's prompt price.
    encode: Price = Price(per_1k_prompt_tokens=0.1, per_cold_start=0.1)

    @model_validator(mode="before")
    @classmethod
    def _rows_were_renamed(cls, data: Any) -> Any:
        old = [row for row in RENAMED_KINDS if isinstance(data, dict) and row in data]
        if old:
            raise ValueError("; ".join(f"`{row}` is now `{RENAMED_KINDS[row]}`" for row in old)
                             + ": rename these rows (the prices themselves are unchanged)")
        return data

    def of(self, kind: str) -> Price:
        """The price a request of ``kind`` pays: its family's (a session pays as traces)."""
        return getattr(self, KINDS[kind].family)
