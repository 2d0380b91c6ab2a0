"""What a streamed completion's chunks carry besides text, read one way for every reader.

``Client.stream`` (:mod:`tpm_fed.completion_stream`, over httpx) and ``tpm
submit``'s light path (:mod:`tpm_fed.cli.quick_stream`, over the standard
library, to start fast) read the same ``/v1/completions`` event stream; both
keep what its chunks say here. Nothing is imported: the light path stays light.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class CompletionChunks:
    """A streamed completion's ``usage``, ``finish_reason`` and ``tpm`` (version, charge...), as its chunks arrive."""

    def __init__(self) -> None:
        self.usage: dict[str, int] | None = None
        self.finish_reason: str | None = None
        self.tpm: dict[str, Any] = {}

    def _read(self, chunk: dict[str, Any]) -> Iterator[str]:
        """Keep what ``chunk`` says of the completion; yield its new text."""
        self.tpm.update(chunk.get("tpm") or {})
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if choice.get("text"):
                yield choice["text"]
