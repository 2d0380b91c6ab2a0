"""The batch side of the Python API: ``Client().batches`` uploads a JSONL file, runs it, and reads results.

The same routes the ``openai`` client's ``files`` and ``batches`` use, through
the :class:`~tpm_fed.client.Client`'s pooled connection; refusals raise the
service's typed errors (``BatchFileInvalid`` naming every bad line,
``InsufficientBalance`` with the quote, ``NotPermitted``...).

Example:
    >>> with Client() as client:
    ...     batch = client.batches.submit("prompts.jsonl", project="astro")
    ...     batch = client.batches.wait(batch["id"])
    ...     for line in client.batches.results(batch["id"]):
    ...         print(line["custom_id"], line["response"]["body"]["choices"][0]["text"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import tpm_fed.batches.jsonl  # noqa: F401 - registers BatchFileInvalid, so refusals come back typed
from tpm_fed.batches.batch_ends import ENDED
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.http_errors import error_from_body


class _Caller(Protocol):
    _http: Any

    def _call(self, method: str, path: str, **options: Any) -> Any: ...


class Batches:
    """The batch routes, through a :class:`~tpm_fed.client.Client`."""

    def __init__(self, client: _Caller) -> None:
        self._client = client

    def upload(self, source: str | Path | bytes, filename: str | None = None) -> dict[str, Any]:
        """Upload a batch input file (a path, or its bytes); every line is checked by the service here."""
        content = source if isinstance(source, bytes) else Path(source).read_bytes()
        name = filename or (Path(source).name if not isinstance(source, bytes) else "batch.jsonl")
        return self._client._call("POST", "/v1/files", files={"file": (name, content, "application/jsonl")},
                                  data={"purpose": "batch"})

    def create(self, input_file_id: str, *, endpoint: str = "/v1/completions", project: str | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Run an uploaded file's lines (quoted first; refused if ``project`` cannot pay the bound)."""
        body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h",
                **({"project": project} if project else {}), **({"metadata": metadata} if metadata else {})}
        return self._client._call("POST", "/v1/batches", json=body)

    def submit(self, source: str | Path | bytes, *, project: str | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Upload ``source`` and run it (the endpoint is its first line's route)."""
        uploaded = self.upload(source)
        return self.create(uploaded["id"], endpoint=_first_url(source), project=project, metadata=metadata)

    def quote(self, source: str | Path | bytes | None = None, *, input_file_id: str | None = None,
              project: str | None = None) -> dict[str, Any]:
        """What a batch would cost at most and when it would be done (nothing is run or charged)."""
        file_id = input_file_id or self.upload(source)["id"]
        return self._client._call("POST", "/v1/quotes", json={"input_file_id": file_id,
                                                              **({"project": project} if project else {})})

    def retrieve(self, batch_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
        """The batch; with ``wait_s``, answered as soon as it ends or after ``wait_s`` (the service's long poll)."""
        return self._client._call("GET", f"/v1/batches/{batch_id}", **({"params": {"wait": wait_s}} if wait_s else {}))

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The caller's batches, newest first (every page)."""
        batches, after = [], None
        while True:
            page = self._client._call("GET", "/v1/batches", params={"limit": limit, **({"after": after} if after
                                                                                     else {})})
            batches.extend(page["data"])
            if not page["has_more"]:
                return batches
            after = page["last_id"]

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: lines not started never run; lines running finish and are charged."""
        return self._client._call("POST", f"/v1/batches/{batch_id}/cancel")

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        """Every line that ended (answers and errors together), in input order."""
        return [json.loads(line) for line in self.results_jsonl(batch_id).splitlines() if line.strip()]

    def results_jsonl(self, batch_id: str) -> bytes:
        return self._raw(f"/tpm/v1/batches/{batch_id}/results")

    def file_content(self, file_id: str) -> bytes:
        """An input file, or a batch's output or error file, as bytes."""
        return self._raw(f"/v1/files/{file_id}/content")

    def wait(self, batch_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Wait until the batch ends; ``progress`` is told of each look (about every ``poll_s``).

        Each look is a long poll: the service answers as soon as the batch ends, so its end is learned at
        once, not up to a poll later. (A service that holds no poll answers at once: then it sleeps.)"""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            asked = time.monotonic()
            wait_s = poll_s if deadline is None else max(0.0, min(poll_s, deadline - asked))
            batch = self.retrieve(batch_id, wait_s=wait_s)
            if progress is not None:
                progress(batch)
            if batch["status"] in ENDED:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} is still {batch['status']} after {timeout_s} s")
            time.sleep(max(0.0, poll_s - (time.monotonic() - asked)))

    def _raw(self, path: str) -> bytes:
        import httpx

        try:
            response = self._client._http.get(path)
        except httpx.HTTPError as error:
            raise SiteError(f"the service could not be reached: {error}") from None
        if response.status_code >= 400:
            raise error_from_body(response.status_code, response.json())
        return response.content


def _first_url(source: str | Path | bytes) -> str:
    """The route of a batch file's first line (the batch's ``endpoint``); the service checks the lines."""
    content = source if isinstance(source, bytes) else Path(source).read_bytes()
    for line in content.splitlines():
        if line.strip():
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError):
                break
            return url if isinstance(url, str) else "/v1/completions"
    return "/v1/completions"
