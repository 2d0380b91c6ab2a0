"""What a request costs, in micro-SUs, from the federation's prices.

The estimate reserved before a run is an upper bound of the final charge:
it counts every prompt byte as a token (byte-level and SentencePiece
tokenizers never make more tokens than bytes, plus a few special tokens),
every allowed completion token, and a cold start when the placement is
cold. The charge after the run uses what was measured, never more than the
estimate, so a project can never be charged beyond what it reserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpm_fed.federation import Price
from tpm_fed.state.schema import MICRO

SPECIAL_TOKENS_ALLOWANCE = 4
"""Tokens a tokenizer may add around a prompt (BOS, EOS, ...)."""


@dataclass(frozen=True)
class Metered:
    """What one request used, as charged."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    activation_bytes: int = 0
    cold_start: bool = False


def price_usu(price: Price, used: Metered) -> int:
    """Micro-SUs for ``used`` at ``price``, rounded up per term."""
    terms = (
        (price.per_1k_prompt_tokens, used.prompt_tokens, 1000),
        (price.per_1k_completion_tokens, used.completion_tokens, 1000),
        (price.per_mb_activations, used.activation_bytes, 1_000_000),
        (price.per_cold_start, int(used.cold_start), 1),
    )
    # Prices are converted to integer micro-SUs per unit block first, so the
    # arithmetic after that is exact integer arithmetic.
    return sum(math.ceil(round(rate * MICRO) * amount / block) for rate, amount, block in terms)


def estimate_usu(price: Price, prompts: list[str], max_new_tokens: int, cold_start: bool) -> int:
    """An upper bound of :func:`price_usu` for a request not yet run."""
    prompt_tokens = sum(len(p.encode()) + SPECIAL_TOKENS_ALLOWANCE for p in prompts)
    return price_usu(
        price,
        Metered(prompt_tokens=prompt_tokens, completion_tokens=max_new_tokens * len(prompts), cold_start=cold_start),
    )
