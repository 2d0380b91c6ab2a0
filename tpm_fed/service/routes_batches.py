"""The batch API: OpenAI's files and batches routes, quotes for a request or a batch, and tpm-fed's results route.

- ``POST /v1/files`` (multipart: ``file``, ``purpose=batch``, optionally OpenAI's ``expires_after[anchor]=created_at``
  and ``expires_after[seconds]``): upload a batch input file, by a member of a project only (403 otherwise, before
  its body is read). It is read a line at a time as it is stored (:class:`~tpm_fed.batches.jsonl.BatchFileChecker`),
  never held whole: a file with bad lines is refused whole, one past the caller's quota (413) stores nothing.
  It expires (30 days by default); an expired file is refused, then swept.
- ``GET /v1/files`` (the caller's uploads, newest first), ``DELETE /v1/files/{id}`` (an upload).
- ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``: an input file, or a batch's output or error file.
- ``POST /v1/batches``: run a file's lines (``project`` as an extra body field); quoted first, and refused
  (429 ``insufficient_quota``, quote in the message) if the project cannot pay the bound.
- ``GET /v1/batches``, ``GET /v1/batches/{id}`` (with tpm-fed's ``?wait=S``: held until the batch ends, at most
  ``S`` seconds, so a waiting client learns of the end at once), ``POST /v1/batches/{id}/cancel``.
- ``POST /v1/quotes``: the quote of one request body, or of a batch file (``input_file_id``).
- ``GET /tpm/v1/batches/{id}/results``: every line that ended, output and errors together, in input order.

Files and batches belong to the identity that made them; another's (or an unknown id) is answered 403
``NotPermitted``, the same answer for both, as ``/tpm/v1/requests/{id}`` does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tpm_fed.batches.batch_ends import ENDED, MAX_WAIT_S
from tpm_fed.batches.jsonl import BatchFileChecker, read_stored_batch_file
from tpm_fed.batches.lines import LineRoutes
from tpm_fed.batches.protocol import (
    FILE_EXPIRY_S,
    MAX_FILE_BYTES,
    MAX_FILE_EXPIRY_S,
    MIN_FILE_EXPIRY_S,
    BatchCreateBody,
    QuoteBody,
)
from tpm_fed.batches.quoting import check_balance, guess_url, quote_batch, quote_line
from tpm_fed.batches.runner import BatchRunner
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, PayloadTooLarge
from tpm_fed.service.auth import identity_of
from tpm_fed.stores.documents import MAX_DOCUMENT_BYTES, check_upload as check_document_upload

router = APIRouter()


def _runner(request: Request) -> BatchRunner:
    """The service's one batch runner (built by :class:`tpm_fed.service.assembly.ServiceAssembly`)."""
    return request.app.state.batches


def _page(items: list[Any], more: bool) -> dict[str, Any]:
    """A page of a list, in OpenAI's shape (the cursor is the last id)."""
    return {"object": "list", "data": [item.model_dump(mode="json") for item in items],
            "first_id": items[0].id if items else None, "last_id": items[-1].id if items else None,
            "has_more": more}


@router.post("/v1/files")
async def upload_file(request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    # Who may upload, and how much, is settled before the body is read (the form is parsed below, not by
    # FastAPI ahead of this function): a caller in no project never gets a byte stored, on disk or here.
    runtime, store = request.app.state.runtime, _runner(request).store
    if not await run_in_threadpool(runtime.projects_of, identity):
        raise NotPermitted(f"{identity!r} is not a member of any project of this federation: only members upload "
                           "batch files")
    room = await run_in_threadpool(store.quota_left, identity)
    # Starlette spools each file part to a temporary file as it arrives (memory holds 1 MiB of it at most).
    async with request.form(max_files=1, max_fields=8) as form:
        file, purpose = form.get("file"), form.get("purpose")
        if file is None or isinstance(file, str):
            raise InvalidRequest("file: a multipart upload with the batch file in its 'file' part")
        if purpose not in ("batch", "assistants"):
            raise InvalidRequest(f"purpose: this service takes files for batches (purpose 'batch') and for vector "
                                 f"stores (purpose 'assistants'), not {purpose!r}")
        lifetime = _expiry_seconds(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
        if purpose == "assistants":  # a document for a vector store: a kind a store reads, with text in it
            size, lines = await run_in_threadpool(check_document_upload, file.file, file.filename or "",
                                                  min(MAX_DOCUMENT_BYTES, room)), 0
        else:
            size, lines = await run_in_threadpool(_check_upload, file.file, _runner(request).routes,
                                                  min(MAX_FILE_BYTES, room), room)
        await run_in_threadpool(file.file.seek, 0)
        stored = await run_in_threadpool(store.add_file, identity, file.filename or "batch.jsonl", file.file, size,
                                         lines, time.time() + lifetime, purpose)
    return stored.model_dump(mode="json")


def _check_upload(source: Any, routes: LineRoutes, limit: int, room: int) -> tuple[int, int]:
    """Read an upload a line at a time, checking each; its size and line count.

    Raises:
        PayloadTooLarge: Over the file limit or the caller's quota left (``room``), as soon as it passes it.
        BatchFileInvalid: Bad lines (all named).
    """
    checker = BatchFileChecker(routes, limit)
    try:
        checker.feed_file(source)  # the spooled file, a line at a time
    except PayloadTooLarge:
        if room < MAX_FILE_BYTES:
            raise PayloadTooLarge(f"this upload is over the {room:,} bytes left in your quota of stored files "
                                  "(delete files you no longer need, or let them expire); nothing was stored") from None
        raise
    checker.finish()
    return checker.bytes, checker.lines


def _expiry_seconds(anchor: Any, seconds: Any) -> int:
    """Seconds an upload lives: OpenAI's ``expires_after`` (``created_at`` + seconds), or the default."""
    if anchor is None and seconds is None:
        return FILE_EXPIRY_S
    if anchor != "created_at":
        raise InvalidRequest(f"expires_after.anchor: 'created_at' is the only anchor, not {anchor!r}")
    try:
        value = int(str(seconds))
    except ValueError:
        raise InvalidRequest(f"expires_after.seconds: a whole number of seconds, not {seconds!r}") from None
    if not MIN_FILE_EXPIRY_S <= value <= MAX_FILE_EXPIRY_S:
        raise InvalidRequest(f"expires_after.seconds: between {MIN_FILE_EXPIRY_S} (an hour) and "
                             f"{MAX_FILE_EXPIRY_S} (30 days), not {value}")
    return value


@router.get("/v1/files")
def list_files(request: Request, after: str | None = None, limit: int = 20, purpose: str | None = None,
               identity: str = Depends(identity_of)) -> dict[str, Any]:
    if not 1 <= limit <= 10_000:
        raise InvalidRequest("limit: between 1 and 10000")
    if purpose not in (None, "batch", "assistants"):  # outputs are reached through their batches
        return _page([], False)
    files, more = _runner(request).store.files_of(identity, after, limit)
    return _page([file for file in files if purpose in (None, file.purpose)], more)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    _runner(request).store.delete_file(file_id, identity)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}")
def file_object(file_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    return _runner(request).store.file(file_id, identity).model_dump(mode="json")


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request, identity: str = Depends(identity_of)) -> Response:
    return StreamingResponse(_runner(request).store.file_content(file_id, identity), media_type="application/jsonl")


@router.post("/v1/batches")
def create_batch(body: BatchCreateBody, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    runtime, runner = request.app.state.runtime, _runner(request)
    project = runtime.project_for(identity, body.project)
    lines = read_stored_batch_file(runner.store.file_content(body.input_file_id, identity), runner.routes)
    # Unlike OpenAI's, a file may mix routes (completions, chat, embeddings): each line names its own.
    quote = quote_batch(runtime, runner.routes, identity, project, lines, runner.window)
    check_balance(quote)
    batch_id = runner.store.create_batch(identity, project, body, lines, quote)
    runner.wake()
    return runner.store.batch(batch_id, identity).model_dump(mode="json")


@router.get("/v1/batches")
def list_batches(request: Request, after: str | None = None, limit: int = 20,
                 identity: str = Depends(identity_of)) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit: between 1 and 100")
    return _page(*_runner(request).store.batches_of(identity, after, limit))


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request, wait: float = 0.0,
                    identity: str = Depends(identity_of)) -> dict[str, Any]:
    """OpenAI's retrieve. ``wait`` (tpm-fed's, seconds): a long poll, answered as soon as the batch ends, or
    after ``wait`` seconds (at most ``MAX_WAIT_S``) with the batch as it is then."""
    if not 0.0 <= wait:  # NaN too; a larger wait than MAX_WAIT_S is cut to it
        raise InvalidRequest(f"wait: seconds to wait for the batch to end, 0 or more (at most {MAX_WAIT_S:g} are "
                             f"used), not {wait!r}")
    runner = _runner(request)
    if wait == 0.0:
        return (await run_in_threadpool(runner.store.batch, batch_id, identity)).model_dump(mode="json")
    watched = runner.ends.watch(batch_id)  # before the read: an end between the read and the wait still wakes it
    try:
        batch = await run_in_threadpool(runner.store.batch, batch_id, identity)  # theirs (403 before any wait)
        if batch.status not in ENDED and await runner.ends.wait(watched, min(wait, MAX_WAIT_S)):
            batch = await run_in_threadpool(runner.store.batch, batch_id, identity)
        return batch.model_dump(mode="json")
    finally:
        runner.ends.unwatch(batch_id, watched)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    runner = _runner(request)
    cancelled = runner.store.cancel(batch_id, identity)
    runner.wake()
    return cancelled.model_dump(mode="json")


@router.get("/tpm/v1/batches/{batch_id}/results")
def batch_results(batch_id: str, request: Request, identity: str = Depends(identity_of)) -> StreamingResponse:
    store = _runner(request).store
    store.batch(batch_id, identity)  # theirs
    return StreamingResponse(store.output_lines(batch_id), media_type="application/jsonl")


@router.post("/v1/quotes")
def quote(body: QuoteBody, request: Request, identity: str = Depends(identity_of)) -> dict[str, Any]:
    """A batch's quote (``input_file_id``), or one request's (``body``), as ``/tpm/v1/quotes`` prices it."""
    runtime, runner = request.app.state.runtime, _runner(request)
    if (body.input_file_id is None) == (body.body is None):
        raise InvalidRequest("give input_file_id (a batch) or body (one request), not both and not neither")
    if body.input_file_id is not None:
        project = runtime.project_for(identity, body.project)
        lines = read_stored_batch_file(runner.store.file_content(body.input_file_id, identity), runner.routes)
        return {"object": "batch.quote", **quote_batch(runtime, runner.routes, identity, project, lines,
                                                       runner.window).model_dump(mode="json")}
    url = body.url or guess_url(body.body)
    return {"object": "quote", **quote_line(runtime, runner.routes, identity, body.project, url, body.body).to_wire()}
