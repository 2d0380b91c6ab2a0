"""Chunking as OpenAI's: windows of the embedding model's own tokens, overlapping, cut back to the text.

Tokens are counted with the store's embedding model's tokenizer (read from its folder, with the light
``tokenizers`` library, no torch), so a chunk of N tokens is N tokens to the encoder that embeds it; each
chunk is the exact slice of the document its tokens came from (offsets), so a citation can be checked
against the file. ``auto`` asks for 800-token chunks overlapping by 400; an encoder with a shorter context
gets chunks of its context instead (overlap half of that), since a longer chunk could not be embedded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpm_fed.protocol.errors import ContextLengthExceeded, InvalidRequest
from tpm_fed.stores.protocol import ChunkingStrategy


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: its text, and where it lies (character offsets into the document's text)."""

    index: int
    text: str
    start: int
    end: int
    tokens: int


class TokenCounter:
    """The embedding model's tokenizer, and how many tokens it may embed at once.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``.
        context_tokens: The most tokens the encoder takes, its special tokens included.
    """

    def __init__(self, tokenizer: Any, context_tokens: int) -> None:
        # A folder's tokenizer.json may pad (MiniLM's pads to 128) or truncate: counting needs neither.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        # What the encoder adds around any text ([CLS] ... [SEP], or a BOS): counted against its context.
        self.special_tokens = len(tokenizer.encode("", add_special_tokens=True).ids)

    @property
    def text_tokens(self) -> int:
        """The most tokens of text one embedding can take."""
        return self.context_tokens - self.special_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def check_query(self, text: str) -> int:
        """The query's tokens.

        Raises:
            ContextLengthExceeded: Over the encoder's context (nothing is cut off silently, nothing charged).
        """
        tokens = self.count(text)
        if tokens > self.text_tokens:
            raise ContextLengthExceeded(f"query: {tokens} tokens; the store's embedding model takes at most "
                                        f"{self.text_tokens} tokens of text")
        return tokens


def sizes_for(strategy: ChunkingStrategy, counter: TokenCounter) -> tuple[int, int]:
    """(chunk tokens, overlap tokens) for ``strategy`` with this encoder.

    Raises:
        InvalidRequest: A static size over the encoder's context.
    """
    size, overlap = strategy.sizes()
    if strategy.type == "auto" and size > counter.text_tokens:
        return counter.text_tokens, counter.text_tokens // 2
    if size > counter.text_tokens:
        raise InvalidRequest(f"chunking_strategy.static.max_chunk_size_tokens: {size} is over the store's "
                             f"embedding model's context ({counter.text_tokens} tokens of text)")
    return size, overlap


def chunk_text(text: str, counter: TokenCounter, size: int, overlap: int) -> list[Chunk]:
    """``text`` cut into windows of ``size`` tokens, each starting ``size - overlap`` tokens after the last."""
    encoding = counter.tokenizer.encode(text, add_special_tokens=False)
    offsets = encoding.offsets
    if not offsets:
        return []
    step = size - overlap
    chunks: list[Chunk] = []
    start = 0
    while True:
        take = min(size, len(offsets) - start)
        while True:  # a slice tokenized alone may take a token more than it did in place: cut one back
            begin, end = offsets[start][0], offsets[start + take - 1][1]
            tokens = counter.count(text[begin:end])
            if tokens <= size or take == 1:
                break
            take -= 1
        chunks.append(Chunk(len(chunks), text[begin:end], begin, end, tokens))
        if start + take >= len(offsets):
            return chunks
        start += max(1, min(step, take - overlap) if take < size else step)
