"""A streamed request's text as a caller may see it now: new text per step, held back where it could change.

Both backends feed their steps through :class:`TextDeltas`; what it returns
leaves on the task's back channel (:mod:`functions.back_channel`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any


class TextDeltas:
    """Turns each row's tokens so far into the new text a caller may see now.

    Text is held back where it could still change: at an end of a word piece
    decoded half (the replacement character), and the last characters that
    could begin one of the request's stop strings. A row stops streaming at
    its own end: end-of-sequence, its ``max_new_tokens``, or a stop string.

    Args:
        rows: Per row of the batch: (request_id, prompt index, max_new_tokens, stop strings),
            or None for a row that does not stream.
        decode: Token ids to text (special tokens skipped), as the final result decodes them.
        eos_token_ids: Ends of sequence.
    """

    def __init__(self, rows: list[tuple[str, int, int, list[str]] | None], decode: Callable[[list[int]], str],
                 eos_token_ids: Collection[int]) -> None:
        self.rows = rows
        self.decode = decode
        self.eos = set(eos_token_ids)
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent: list[int] = [0] * len(rows)
        self.done: list[bool] = [row is None for row in rows]

    def step(self, tokens: list[int]) -> list[dict[str, Any]]:
        """One new token per row; the chunks that are ready now."""
        chunks = []
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            request_id, index, max_new_tokens, stop = self.rows[row]  # type: ignore[misc]
            if token in self.eos:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            finished = len(self.ids[row]) >= max_new_tokens
            text = self.decode(self.ids[row])
            hits = [text.find(s) for s in stop if s in text]
            if hits:
                text, finished = text[: min(hits)], True
            ready = ready_length(text, stop, finished)
            if ready > self.sent[row]:
                chunks.append({"request_id": request_id, "index": index, "text": text[self.sent[row]:ready]})
                self.sent[row] = ready
            self.done[row] = finished
        return chunks


def ready_length(text: str, stop: list[str], finished: bool) -> int:
    """How much of a row's text so far a caller may see: all of it once the row ended; before,
    not a half-decoded character at its end, nor the last characters that could begin a stop string."""
    if finished:
        return len(text)
    length = len(text.rstrip("\ufffd"))
    hold = max((len(s) - 1 for s in stop), default=0)
    return max(0, length - hold)
