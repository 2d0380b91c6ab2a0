"""One prompt's completion streamed over the standard library's HTTP client: the warm ``tpm submit``.

A warm ``tpm submit "..."`` is mostly Python starting and importing: the
full client (httpx, the request contract's pydantic models, the home's
federation models) costs about half a second of imports before the first
byte is sent. This path imports none of that. It speaks to a service
already running (``TPM_URL`` with ``TPM_TOKEN``, or the home's
``service.json`` whose process is alive), on one kept-alive connection:

1. ``GET /v1/models``: the default model, whether a replica is warm, and
   the health check (a service that does not answer is the full path's
   to start again; nothing was sent yet);
2. ``POST /v1/completions`` streamed, as the ``openai`` client sends it.

The service validates the body, once, as it does for every OpenAI client,
and its refusal (OpenAI's error body, our type's name in ``code``) is
raised here as the same typed error. Anything else (no service yet, a
stored login, several prompts, ``--json``...) takes the full client.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from tpm_fed.completion_chunks import CompletionChunks
from tpm_fed.connection import ServiceAddress
from tpm_fed.protocol import errors

CONNECT_TIMEOUT_S = 10.0
"""How long to wait to connect and for ``/v1/models``; the completion itself may wait for a cold start."""


class ServiceNotAnswering(Exception):
    """Nothing was sent: the service named did not answer (the full path starts a new one)."""


class QuickStream(CompletionChunks):
    """Iterate for the text; then ``usage``, ``finish_reason`` and ``tpm`` are set (as :class:`CompletionStream`)."""

    def __init__(self, address: ServiceAddress) -> None:
        parts = urlsplit(address.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.url = address.url
        self._prefix = parts.path.rstrip("/")
        self._connection = kind(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT_S)
        self._headers = {"Authorization": f"Bearer {address.token}"} if address.token else {}
        super().__init__()

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``'s cards: the first is the default model.

        Raises:
            ServiceNotAnswering: It could not be asked (nothing was sent).
        """
        try:
            self._connection.request("GET", f"{self._prefix}/v1/models", headers=self._headers)
            answer = self._connection.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise ServiceNotAnswering(str(error)) from None
        if answer.status >= 400:
            raise _refusal(answer.status, body)
        return json.loads(body)["data"]

    def complete(self, body: dict[str, Any]) -> Iterator[str]:
        """Send ``body`` (a streamed ``/v1/completions`` request) and yield its text as it comes."""
        try:
            self._connection.request("POST", f"{self._prefix}/v1/completions", body=json.dumps(body).encode(),
                                     headers={**self._headers, "Content-Type": "application/json"})
            self._connection.sock.settimeout(None)  # a request may queue for a replica's cold start
            answer = self._connection.getresponse()
            if answer.status >= 400:
                raise _refusal(answer.status, answer.read())
            for line in answer:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise _refusal(500, line[6:])
                yield from self._read(chunk)
        except errors.TpmError:
            raise  # the service's refusal (NotPermitted is also an OSError: a PermissionError)
        except (OSError, http.client.HTTPException) as error:
            # Sent, perhaps run: never sent again (it could be charged twice).
            raise errors.SiteError(f"the service at {self.url} could not be reached: {error}") from None
        finally:
            self.close()

    def close(self) -> None:
        self._connection.close()


def _refusal(status: int, body: bytes) -> errors.TpmError:
    """The typed error an OpenAI error body carries, read as :func:`tpm_fed.protocol.http_errors.error_from_body`
    reads it (that module's pydantic models are what this path does not import)."""
    try:
        detail = json.loads(body)["error"]
        code, message = str(detail.get("code") or ""), str(detail.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return errors.RemoteExecutionError(f"HTTP {status}: {body[:2000]!r}")
    if status == 401:
        return errors.Unauthenticated(message)
    if code == "insufficient_quota":
        return errors.InsufficientBalance(message)
    return errors.error_from_wire({"type": code, "message": message})
