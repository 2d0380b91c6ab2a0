"""Knowledge in answers: a store's hits put into the prompt with one documented template, and cited.

The template (docs/stores.md shows it too)::

    Answer using the numbered sources; cite them as [1], [2].
    [1] FILENAME (chunk N)
    TEXT
    [2] ...
    Question: QUESTION
    Answer:

Sources go in best first, as long as the prompt still fits the answering model's context with room for
the answer (``max_output_tokens``); the hits left out are named in the answer's ``tpm`` object, never cut
mid-text. Every source the model was given is cited in the answer (file id, filename, chunk, snapshot),
so a caller can check what the answer stood on; the ``tpm`` object carries the exact prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpm_fed.protocol.errors import ContextLengthExceeded
from tpm_fed.stores.search import Hit

INSTRUCTION = "Answer using the numbered sources; cite them as [1], [2]."


@dataclass(frozen=True)
class Source:
    number: int
    hit: Hit
    snapshot: str


@dataclass(frozen=True)
class Prompt:
    text: str
    sources: list[Source]
    left_out: list[Source]


def source_block(number: int, hit: Hit) -> str:
    return f"[{number}] {hit.chunk.filename} (chunk {hit.chunk.index})\n{hit.chunk.text}\n"


def build_prompt(question: str, hits: list[tuple[Hit, str]], count_tokens: Any, room: int,
                 conversation: str = "", instructions: str | None = None) -> Prompt:
    """The prompt for ``question`` with as many of ``hits`` (``(hit, snapshot ref)``, best first) as fit in
    ``room`` tokens (``count_tokens(text) -> int``).

    Raises:
        ContextLengthExceeded: The question alone does not fit.
    """
    head = f"{instructions}\n" if instructions else ""
    head += f"{INSTRUCTION}\n" if hits else ""
    tail = f"{conversation}Question: {question}\nAnswer:"
    if count_tokens(head + tail) > room:
        raise ContextLengthExceeded(f"the question and conversation take {count_tokens(head + tail)} tokens; the "
                                    f"model has room for {room} beside its answer")
    given: list[Source] = []
    left: list[Source] = []
    body = ""
    for hit, snapshot in hits:
        block = source_block(len(given) + 1, hit)
        if count_tokens(head + body + block + tail) <= room:
            body += block
            given.append(Source(len(given) + 1, hit, snapshot))
        else:
            left.append(Source(0, hit, snapshot))
    if not given:
        head = f"{instructions}\n" if instructions else ""
    return Prompt(head + body + tail, given, left)


def citation(source: Source, position: int) -> dict[str, Any]:
    """OpenAI's ``file_citation`` annotation, with the chunk and snapshot beside its fields."""
    chunk = source.hit.chunk
    return {"type": "file_citation", "file_id": chunk.file_id, "filename": chunk.filename, "index": position,
            "tpm": {"source": source.number, "chunk": chunk.index, "start": chunk.start, "end": chunk.end,
                    "snapshot": source.snapshot, "text": chunk.text}}


def result_item(hit: Hit) -> dict[str, Any]:
    """A hit as the Responses API's ``file_search_call.results`` lists it."""
    return {"file_id": hit.chunk.file_id, "filename": hit.chunk.filename, "score": hit.score,
            "attributes": hit.chunk.attributes, "text": hit.chunk.text}
