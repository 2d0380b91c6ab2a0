"""Turn a row of generated tokens into a :class:`Completion`.

Rows of one padded batch all run to the longest request's budget; each row is
then cut back to its own request: at its own max_new_tokens, at the model's
end-of-sequence token, or at the first stop string, whichever comes first.
Cutting a greedy row afterwards equals stopping it early, because a causal
model never looks ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from tpm_fed.protocol.results import Completion


def finish_row(
    token_ids: list[int],
    *,
    max_new_tokens: int,
    eos_token_ids: Collection[int],
    stop: list[str],
    decode: Callable[[list[int]], str],
) -> Completion:
    """Cut one generated row to what its request asked for."""
    reason = "length"
    ids = token_ids[:max_new_tokens]
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            ids, reason = ids[:position], "eos"
            break
    text = decode(ids)
    if stop and any(s in text for s in stop):
        return _cut_at_stop(ids, stop, decode)
    return Completion(text=text, token_ids=ids, finish_reason=reason)


def _cut_at_stop(ids: list[int], stop: list[str], decode: Callable[[list[int]], str]) -> Completion:
    # The shortest prefix whose text holds a stop string: tokens after it were
    # generated only because the batch ran on, not because this request asked.
    for end in range(1, len(ids) + 1):
        text = decode(ids[:end])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return Completion(text=text[: min(hits)], token_ids=ids[:end], finish_reason="stop")
    raise AssertionError("a stop string was in the full text but in no prefix")
