"""The batch API's shapes, in one module: what callers send and what the service answers.

The objects follow OpenAI's batch and file objects field for field, so the
official ``openai`` client parses them (``client.files``, ``client.batches``);
tpm-fed's own facts (the project charged, SUs, the quote) travel in a
``tpm`` object beside them, as the other routes do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_FILE_BYTES = 100 * 1024 * 1024
"""The largest batch input file the service takes (100 MiB, OpenAI's own limit is 200 MB)."""

MAX_FILE_LINES = 50_000
"""The most lines one batch file may hold (OpenAI's limit)."""

UPLOAD_QUOTA_BYTES = 1024 * 1024 * 1024
"""Bytes of uploaded files one identity may keep at once, by default (1 GiB: ten of the largest files);
the operator sets another with ``TPM_UPLOAD_QUOTA_BYTES``. Expired and deleted files do not count."""

UPLOAD_QUOTA_VARIABLE = "TPM_UPLOAD_QUOTA_BYTES"

FILE_EXPIRY_S = 30 * 24 * 3600
"""An uploaded file expires this long after its upload unless ``expires_after`` says sooner (OpenAI's
default for batch files: 30 days); an expired file is refused and then swept."""

MIN_FILE_EXPIRY_S, MAX_FILE_EXPIRY_S = 3600, 30 * 24 * 3600
"""The ``expires_after.seconds`` OpenAI accepts: one hour to thirty days."""

FILE_PART_BYTES = 256 * 1024
"""An upload is stored a part of at most this many bytes per row."""

COMPLETION_WINDOW = "24h"
"""The only completion window OpenAI (and so this service) accepts."""

WINDOW_S = 24 * 3600

BatchUrl = Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tpm/v1/requests"]
BATCH_URLS: tuple[str, ...] = BatchUrl.__args__  # type: ignore[attr-defined]
"""The routes a batch line may name: the OpenAI-compatible three, and tpm-fed's native one (any kind, traces too)."""

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]

LineState = Literal["pending", "running", "done", "failed", "cancelled"]
"""A line's life: ``pending`` until the runner claims it, ``running`` while its request is out, then one of the
three ends. Only ``done`` and ``failed`` lines ran; only they can carry a charge."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchInputLine(_Strict):
    """One line of a batch input file (OpenAI's format)."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: BatchUrl
    body: dict[str, Any]


class FileObject(BaseModel):
    """``GET /v1/files/{id}``: an uploaded batch input, or a batch's output or error file."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output", "assistants"]
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    expires_at: int | None = None
    status_details: str | None = None


class BatchCreateBody(_Strict):
    """``POST /v1/batches``. ``project`` is tpm-fed's (an extra body field): the project every line charges,
    unless a line's body names its own."""

    input_file_id: str = Field(min_length=1)
    endpoint: BatchUrl
    completion_window: Literal["24h"] = COMPLETION_WINDOW
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted as OpenAI's clients may send it; outputs stay
    project: str | None = None

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > 16:
            raise ValueError("at most 16 metadata keys")
        for key, value in metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return metadata


class QuoteBody(_Strict):
    """``POST /v1/quotes``: a batch (``input_file_id``) or one request (``body``, for the route ``url``;
    the route is guessed from the body's fields when ``url`` is not given)."""

    input_file_id: str | None = None
    url: BatchUrl | None = None
    body: dict[str, Any] | None = None
    project: str | None = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    """Tokens of the lines that ran, in OpenAI's shape."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class BatchQuote(BaseModel):
    """What a batch would cost at most and when it would be done, before anything runs.

    Attributes:
        max_su: The charge never exceeds this: the lines' bounds without their cold starts, plus
            as many cold starts as replicas may start at each site (never more than the lines).
        max_su_per_site: The same per site the lines would be placed on (what the balance check compares).
        available_su: The project's balance at those sites now.
        estimated_s: Seconds to the last line: the first wave's slowest quote, then the rest in waves of
            the runner's window at the warm replica's pace (a rough guide, not a promise).
    """

    project: str
    lines: int
    max_su: float
    expected_su: float
    max_su_per_site: dict[str, float]
    available_su: dict[str, float]
    estimated_s: float


class BatchTpm(BaseModel):
    """tpm-fed's facts about a batch, beside OpenAI's fields."""

    project: str
    charged_su: float
    completion_tokens: int
    prompt_tokens: int
    running: int
    pending: int
    cancelled: int
    quote: BatchQuote | None = None
    estimated_finish_at: float | None = None


class BatchObject(BaseModel):
    """A batch as OpenAI's ``Batch`` object (``client.batches.retrieve``), plus ``tpm``."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None
    tpm: BatchTpm


class LineResponse(BaseModel):
    """What the line's route answered: its status, the request's id, and the very body it would return alone."""

    status_code: int
    request_id: str | None
    body: dict[str, Any]


class LineError(BaseModel):
    """Why a line has no response at all (it never ran: the batch was cancelled)."""

    code: str
    message: str


class OutputLine(BaseModel):
    """One line of a batch's output or error file (OpenAI's format)."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None


__all__ = [
    "BATCH_URLS",
    "COMPLETION_WINDOW",
    "MAX_FILE_BYTES",
    "MAX_FILE_LINES",
    "WINDOW_S",
    "BatchCreateBody",
    "BatchInputLine",
    "BatchObject",
    "BatchQuote",
    "BatchStatus",
    "BatchTpm",
    "BatchUrl",
    "BatchUsage",
    "FileObject",
    "LineError",
    "LineResponse",
    "LineState",
    "OutputLine",
    "QuoteBody",
    "RequestCounts",
]
