"""Reading a batch input file: JSONL in, checked lines out, or every bad line named at once.

One function checks a file, where it enters (the upload): its size, that
every line is a JSON object in OpenAI's batch shape naming a route the
service batches, that its body is valid for that route (the route's own
body model), and that no ``custom_id`` repeats. A caller fixes the whole file
from one answer instead of meeting its problems one run at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import BinaryIO

from pydantic import ValidationError

from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.protocol import BATCH_URLS, BatchInputLine, MAX_FILE_BYTES, MAX_FILE_LINES
from tpm_fed.protocol.errors import InvalidRequest, PayloadTooLarge, TpmError
from tpm_fed.protocol.http_errors import describe_errors
from tpm_fed.protocol.limits import MAX_PAYLOAD_BYTES

MAX_LINE_BYTES = MAX_PAYLOAD_BYTES
"""The longest line: one request, which must fit in one task (so an upload is never read more than this at once)."""

SHOWN_PROBLEMS = 50
"""Problems spelled out in one refusal (the rest are counted)."""


class BatchFileInvalid(InvalidRequest):
    """A batch file with bad lines; ``problems`` holds ``(line number, what is wrong)`` for each (1-based)."""

    def __init__(self, problems: list[tuple[int, str]] | str) -> None:
        if isinstance(problems, str):  # rebuilt from its message by a client (error_from_wire)
            self.problems = []
            super().__init__(problems)
            return
        self.problems = problems
        shown = "; ".join(f"line {number}: {why}" for number, why in problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        super().__init__(f"the batch file has {len(problems)} bad line{'s' * (len(problems) != 1)}: {shown}{more}")


def read_batch_file(content: bytes, routes: LineRoutes) -> list[BatchInputLine]:
    """The lines of a batch file, in order (blank lines skipped), each checked for its route.

    Raises:
        PayloadTooLarge: Over :data:`MAX_FILE_BYTES`.
        BatchFileInvalid: Any bad line (all of them are named, with their line numbers), or no line at all.
    """
    if len(content) > MAX_FILE_BYTES:
        raise PayloadTooLarge(f"the batch file is {len(content):,} bytes; the most is {MAX_FILE_BYTES:,}")
    return read_stored_batch_file([content], routes)


def read_stored_batch_file(parts: Iterable[bytes], routes: LineRoutes) -> list[BatchInputLine]:
    """The lines of a stored file, read from its parts (a line may span two) without joining them whole."""
    checker = BatchFileChecker(routes)
    lines, rest = [], b""
    for part in parts:
        pieces = (rest + part).split(b"\n")
        rest = pieces.pop()
        lines += [line for raw in pieces if (line := checker.feed(raw + b"\n")) is not None]
    if rest:
        lines += [line] if (line := checker.feed(rest)) is not None else []
    checker.finish()
    return lines


class BatchFileChecker:
    """Checks a batch file a line at a time, as it is read, so no file is ever held whole to be checked.

    ``feed`` each raw line (bytes, with or without its newline), in order; ``finish`` raises what was
    wrong with any of them, all named at once. What it keeps between lines is the ``custom_id`` of each
    (to refuse repeats), at most :data:`MAX_FILE_LINES` of them.
    """

    def __init__(self, routes: LineRoutes, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.routes = routes
        self.max_bytes = max_bytes
        self.bytes = 0
        self.lines = 0
        self.number = 0
        self.problems: list[tuple[int, str]] = []
        self._first_seen: dict[str, int] = {}
        self._too_many = False

    def feed(self, raw: bytes) -> BatchInputLine | None:
        """The line checked (None for a blank or bad one; a bad one is noted for :meth:`finish`).

        Raises:
            PayloadTooLarge: The file passed ``max_bytes`` with this line (at once: the rest is not read).
        """
        self.number += 1
        self.bytes += len(raw)
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(f"the batch file is over {self.max_bytes:,} bytes, the most this upload may be")
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self.problems.append((self.number, "not UTF-8 text"))
            return None
        if not text.strip():
            return None
        try:
            line = _read_line(text, self.routes)
        except _BadLine as bad:
            self.problems.append((self.number, str(bad)))
            return None
        if line.custom_id in self._first_seen:
            self.problems.append((self.number, f"custom_id {line.custom_id!r} repeats line "
                                               f"{self._first_seen[line.custom_id]}"))
            return None
        if len(self._first_seen) >= MAX_FILE_LINES:
            if not self._too_many:  # said once, at the first line past the limit
                self.problems.append((self.number, f"a batch holds at most {MAX_FILE_LINES:,} lines"))
            self._too_many = True
            return None
        self._first_seen[line.custom_id] = self.number
        self.lines += 1
        return line

    def feed_file(self, source: BinaryIO) -> None:
        """Feed every line of a binary file, reading one line (at most :data:`MAX_LINE_BYTES`) at a time.

        Raises:
            PayloadTooLarge: Over ``max_bytes`` (at once).
            BatchFileInvalid: A line over :data:`MAX_LINE_BYTES` (a line is one request: it could never run).
        """
        while raw := source.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES:
                raise BatchFileInvalid([(self.number + 1, f"a line is over {MAX_LINE_BYTES:,} bytes, the most "
                                                          "one request may be")])
            self.feed(raw)

    def finish(self) -> None:
        """Raises BatchFileInvalid: any line was bad, or there was no line at all."""
        if not self.lines and not self.problems:
            self.problems.append((1, "the file holds no lines"))
        if self.problems:
            raise BatchFileInvalid(self.problems)


class _BadLine(Exception):
    pass


def _read_line(raw: str, routes: LineRoutes) -> BatchInputLine:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise _BadLine(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise _BadLine(f"a line is a JSON object, not {type(data).__name__}")
    if "url" in data and data["url"] not in BATCH_URLS:
        raise _BadLine(f"url: {data['url']!r} is not a route batches run (one of {', '.join(BATCH_URLS)})")
    try:
        line = BatchInputLine.model_validate(data)
    except ValidationError as error:
        raise _BadLine(describe_errors(error.errors())) from None
    try:
        routes.parse_body(line.url, line.body)
    except TpmError as error:
        raise _BadLine(f"body (for {line.url}): {error}") from None
    return line
