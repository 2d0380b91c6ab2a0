"""``Client.stream(...)``: a completion's text as the replica makes it, then its usage and charge.

It reads the service's ``/v1/completions`` event stream (the same one the
``openai`` client reads) on the client's pooled connection. Iterating yields
each new piece of text; afterwards ``usage``, ``finish_reason`` and ``tpm``
(exact version, site, replica, charge, and ``streamed``: whether the text
really came piece by piece) are set.

Example:
    >>> stream = client.stream("The telescope", max_new_tokens=32)
    >>> for piece in stream:
    ...     print(piece, end="", flush=True)
    >>> print(stream.tpm["version"], stream.usage)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tpm_fed.completion_chunks import CompletionChunks
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.http_errors import error_from_body
from tpm_fed.protocol.generation import GenerationRequest

_BODY_FIELDS = {  # GenerationRequest field -> /v1/completions body field
    "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
    "top_p": "top_p", "seed": "seed", "stop": "stop", "backend": "backend", "project": "project",
    "location": "location", "site": "site",
}


def completion_body(request: GenerationRequest) -> dict[str, Any]:
    """The streamed ``/v1/completions`` body asking for what ``request`` asks (one prompt)."""
    if len(request.prompts) != 1:
        raise ValueError("a stream answers one prompt")
    body = {"model": str(request.model), "prompt": request.prompts[0], "stream": True,
            "stream_options": {"include_usage": True}}
    for field, name in _BODY_FIELDS.items():
        value = getattr(request, field)
        if value is not None and value != [] and not (field == "min_new_tokens" and value == 0):
            body[name] = value
    return body


class CompletionStream(CompletionChunks):
    """Iterate for the text; then read ``usage``, ``finish_reason`` and ``tpm``."""

    def __init__(self, http: Any, body: dict[str, Any], url: str) -> None:
        super().__init__()
        self._http, self._body, self._url = http, body, url

    def __iter__(self) -> Iterator[str]:
        import httpx

        try:
            with self._http.stream("POST", "/v1/completions", json=self._body) as answer:
                if answer.status_code >= 400:
                    raise error_from_body(answer.status_code, json.loads(answer.read() or b"{}"))
                for line in answer.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise error_from_body(500, chunk)
                    yield from self._read(chunk)
        except httpx.HTTPError as error:
            raise SiteError(f"the service at {self._url} could not be reached: {error}") from None
