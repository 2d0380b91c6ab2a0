"""How large one step of a replica's vLLM engine is: the rows and the tokens it may hold.

A replica serves requests as they come, as vLLM's own OpenAI server does, so
it takes that server's sizes on the hardware it runs on (``vllm.LLM`` takes
the sizes of offline batch runs instead: on a CPU 256 rows and 4,096 tokens a
step, against the server's 128 and 2,048), but for the tokens a step holds on
a CPU.

On a CPU a step's time grows with its tokens. Clients that send together
(16 streams whose answers end in the same step, a batch's next lines) hand
the engine a burst of prompts, and prefilled in one long step they all have
their first token at its end. With steps of at most :data:`STEP_TOKENS_ON_CPU`
tokens, vLLM prefills the burst in chunks, a few prompts a step, and the
first of them have their first token after the first step; a decode step
(one token a row) fits either way. Measured on the engine alone here (a
burst of 16 prompts of 64 tokens, 64 out; ``scripts/bench_step_tokens.py``,
docs/performance.md), 512 tokens a step against the server's 2,048: the
burst's median first token at 0.71-0.76x, its last at 1.01-1.11x, and the
whole burst in 0.77-0.99x the time, on the demo model and on the
135 M-parameter SmolLM2. 256 did about as well on SmolLM2 but worse on the
demo model, whose steps cost more per token the smaller they are (its last
first token at 1.35x).

A site's ``worker.step_tokens`` (``TPM_STEP_TOKENS``) sets it either way.
Unset on a GPU, the server's own size stands (not measured there). Where
chunked prefill is off (encoder-decoder models, RISC-V CPUs), a step must
hold a whole prompt, so by default vLLM sizes it to the model's context,
on any hardware; a site's number is passed on, and vLLM refuses to start
below the context.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

STEP_TOKENS_ON_CPU = 512
"""The most tokens one engine step holds on a CPU, unless the site says otherwise."""


def step_limits(world_size: int, model_dir: Path, configured_tokens: int | None) -> dict[str, int]:
    """``max_num_seqs`` and ``max_num_batched_tokens`` for a replica's ``vllm.LLM`` (see the module's docstring).

    Args:
        world_size: The replica's tensor-parallel size (vLLM's server sizes steps per rank).
        model_dir: The model's folder (its ``config.json`` says whether it is an encoder-decoder).
        configured_tokens: The site's ``step_tokens``, or None.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    tokens, rows = EngineArgs.get_batch_defaults(world_size)
    limits = {"max_num_batched_tokens": tokens.get(UsageContext.OPENAI_API_SERVER),
              "max_num_seqs": rows.get(UsageContext.OPENAI_API_SERVER)}
    budget = configured_tokens
    if budget is None:
        if not chunked_prefill(model_dir):  # a step must hold a whole prompt: vLLM sizes it to the context
            del limits["max_num_batched_tokens"]
        elif current_platform.is_cpu():
            budget = STEP_TOKENS_ON_CPU
    if budget is not None:
        limits["max_num_batched_tokens"] = budget
        if limits["max_num_seqs"] is not None:  # vLLM asks for no more rows than tokens in a step
            limits["max_num_seqs"] = min(limits["max_num_seqs"], budget)
    return {name: value for name, value in limits.items() if value is not None}


def chunked_prefill(model_dir: Path) -> bool:
    """Whether vLLM prefills this model's long prompts in chunks here (it does not for encoder-decoder
    models, nor on RISC-V CPUs)."""
    if platform.machine().lower().startswith("riscv"):
        return False
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return True  # vLLM reads it next, and says what is wrong with it
    return not (isinstance(config, dict) and config.get("is_encoder_decoder"))
