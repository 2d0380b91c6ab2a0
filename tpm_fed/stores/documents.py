"""Which uploaded files a vector store reads, and their text.

Text (``.txt``), Markdown (``.md``, ``.markdown``), JSONL (``.jsonl``: each line a JSON value; an object's
``text`` field, or else the line itself, is one paragraph) and PDF (``.pdf``, read with ``pypdf``, pure
Python). Anything else is refused by name at upload (``purpose=assistants``) and again at ingestion. A file
is refused whole (no half of it is ever indexed): empty, over the size limit, not UTF-8, a bad JSONL line,
a PDF that does not parse or has no text.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePosixPath
from typing import BinaryIO

from tpm_fed.protocol.errors import InvalidRequest, PayloadTooLarge

MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
"""The largest file a store takes (32 MiB; OpenAI's is 512 MB, its files hold far more text than a CPU
encoder embeds in reasonable time)."""

SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".jsonl": "jsonl", ".pdf": "pdf"}


class UnsupportedFile(InvalidRequest):
    """A file of a kind a store does not read (OpenAI's ``unsupported_file``)."""


class InvalidFile(InvalidRequest):
    """A file of a kind a store reads whose content is not readable (OpenAI's ``invalid_file``)."""


def kind_of(filename: str) -> str:
    """``text``, ``markdown``, ``jsonl`` or ``pdf``.

    Raises:
        UnsupportedFile: Any other suffix.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise UnsupportedFile(f"{filename!r}: a vector store reads {', '.join(sorted(SUFFIXES))} files, "
                              f"not {suffix or 'files without a suffix'}")
    return SUFFIXES[suffix]


def check_upload(source: BinaryIO, filename: str, limit: int) -> int:
    """Check an upload for a store (``purpose=assistants``) as it is stored; its size.

    Raises:
        UnsupportedFile, InvalidFile: As :func:`text_of` would.
        PayloadTooLarge: Over ``limit`` bytes.
    """
    kind_of(filename)
    data = source.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{filename!r} is over {limit:,} bytes, the most a store file may hold; "
                              "nothing was stored")
    text_of(data, filename)
    return len(data)


def text_of(data: bytes, filename: str) -> str:
    """The text a store indexes from a file's bytes.

    Raises:
        UnsupportedFile: A suffix a store does not read.
        InvalidFile: Empty, not UTF-8, a line that is not JSON, a PDF that does not parse or holds no text.
        PayloadTooLarge: Over :data:`MAX_DOCUMENT_BYTES`.
    """
    kind = kind_of(filename)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise PayloadTooLarge(f"{filename!r} is {len(data):,} bytes; a store file may hold {MAX_DOCUMENT_BYTES:,}")
    if kind == "pdf":
        text = _pdf_text(data, filename)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidFile(f"{filename!r} is not UTF-8 text (byte {error.start})") from None
        if kind == "jsonl":
            text = _jsonl_text(text, filename)
    if not text.strip():
        raise InvalidFile(f"{filename!r} holds no text")
    return text


def _jsonl_text(text: str, filename: str) -> str:
    paragraphs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise InvalidFile(f"{filename!r}, line {number}: not JSON") from None
        paragraphs.append(value["text"] if isinstance(value, dict) and isinstance(value.get("text"), str) else line)
    return "\n\n".join(paragraphs)


def _pdf_text(data: bytes, filename: str) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError

        reader = PdfReader(io.BytesIO(data), strict=False)
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as error:
        raise InvalidFile(f"{filename!r} is not a readable PDF ({type(error).__name__})") from None
