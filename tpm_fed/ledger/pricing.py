"""What a request costs, in micro-SUs, from the federation's prices.

The estimate reserved before a run is an upper bound of the final charge:
the request's :class:`~tpm_fed.request.UsageBound` (every prompt byte
counted as a token, every allowed completion token, the most tensor bytes
it can get back), and a cold start when the placement is cold. The charge after the run uses what was measured, never more than the
estimate, so a project can never be charged beyond what it reserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpm_fed.federation import Price
from tpm_fed.protocol.requests import UsageBound
from tpm_fed.state.schema import MICRO

@dataclass(frozen=True)
class Metered:
    """What one request used, as charged."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    activation_bytes: int = 0
    cold_start: bool = False
    nodes: int = 1
    """Nodes the replica holds: a cold start starts every one of them."""
    node_ms: int = 0
    """Milliseconds of replica time charged, summed over all the replica's nodes."""


def price_usu(price: Price, used: Metered) -> int:
    """Micro-SUs for ``used`` at ``price``, rounded up per term."""
    terms = (
        (price.per_1k_prompt_tokens, used.prompt_tokens, 1000),
        (price.per_1k_completion_tokens, used.completion_tokens, 1000),
        (price.per_mb_activations, used.activation_bytes, 1_000_000),
        (price.per_cold_start, int(used.cold_start) * used.nodes, 1),
        (price.per_node_hour, used.node_ms, 3_600_000),
    )
    # Prices are converted to integer micro-SUs per unit block first, so the
    # arithmetic after that is exact integer arithmetic.
    return sum(math.ceil(round(rate * MICRO) * amount / block) for rate, amount, block in terms)


def estimate_usu(price: Price, bound: UsageBound, cold_start: bool) -> int:
    """An upper bound of :func:`price_usu` for a request not yet run, less its node time
    (which depends on the site: :func:`node_time_bound_usu`)."""
    return price_usu(price, Metered(bound.prompt_tokens, bound.completion_tokens, bound.result_bytes, cold_start))


def node_time_bound_usu(price: Price, nodes: int, task_timeout_s: float) -> int:
    """The most node time a request can be charged on a replica of ``nodes`` nodes: every node for
    the site's whole task timeout (a task running longer fails, and its requests are released)."""
    return price_usu(price, Metered(node_ms=math.ceil(task_timeout_s * 1000) * nodes))


def node_ms_used(nodes: int, load_s: float, run_s: float, batch_size: int) -> int:
    """A request's node time: its share of the task's load and run time, on every node."""
    return math.ceil((load_s + run_s) * 1000 * nodes / max(batch_size, 1))
