"""Reading a batch input file: JSONL in, checked lines out, or every bad line named at once.

One function checks a file, where it enters (the upload): its size, that
every line is a JSON object in OpenAI's batch shape naming a route the
service batches, that its body is valid for that route (the route's own
body model), and that no ``custom_id`` repeats. A caller fixes the whole file
from one answer instead of meeting its problems one run at a time.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from tpm_fed.batches.lines import parse_body
from tpm_fed.batches.protocol import (
    BATCH_URLS,
    MAX_FILE_BYTES,
    MAX_FILE_LINES,
    BatchInputLine,
)
from tpm_fed.protocol.errors import InvalidRequest, PayloadTooLarge, TpmError

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


def read_batch_file(content: bytes) -> list[BatchInputLine]:
    """The lines of a batch file, in order (blank lines skipped), each checked for its route.

    Raises:
        PayloadTooLarge: Over :data:`MAX_FILE_BYTES`.
        BatchFileInvalid: Any bad line (all of them are named, with their line numbers), or no line at all.
    """
    if len(content) > MAX_FILE_BYTES:
        raise PayloadTooLarge(f"the batch file is {len(content):,} bytes; the most is {MAX_FILE_BYTES:,}")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BatchFileInvalid([(content[:error.start].count(b"\n") + 1, "not UTF-8 text")]) from None
    lines: list[BatchInputLine] = []
    problems: list[tuple[int, str]] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = _read_line(raw)
        except _BadLine as bad:
            problems.append((number, str(bad)))
            continue
        if line.custom_id in first_seen:
            problems.append((number, f"custom_id {line.custom_id!r} repeats line {first_seen[line.custom_id]}"))
            continue
        first_seen[line.custom_id] = number
        lines.append(line)
    if not lines and not problems:
        problems.append((1, "the file holds no lines"))
    if len(lines) + len(problems) > MAX_FILE_LINES:
        problems.append((MAX_FILE_LINES + 1, f"a batch holds at most {MAX_FILE_LINES:,} lines"))
    if problems:
        raise BatchFileInvalid(problems)
    return lines


class _BadLine(Exception):
    pass


def _read_line(raw: str) -> BatchInputLine:
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
        from tpm_fed.service.errors import describe_errors

        raise _BadLine(describe_errors(error.errors())) from None
    try:
        parse_body(line.url, line.body)
    except TpmError as error:
        raise _BadLine(f"body (for {line.url}): {error}") from None
    return line
