"""Reading a result's tensors by reference: from the site's store when this process can reach it, else the service.

A file store on a shared file system (the embedded default: a folder under
the home) is read directly, with no hop through the service. Anything else,
or a store this machine cannot see, is read through the service's
``GET /tpm/v1/requests/{id}/tensors``, which checks that the caller owns the
request. Either way the bytes are checked against the reference's digest as
they pass, one chunk in memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from tpm_fed.protocol.errors import ReferenceNotFound
from tpm_fed.protocol.http_errors import error_from_body
from tpm_fed.storage.reference_chunks import check_current, checked, get_chunks
from tpm_fed.protocol.references import CHUNK_BYTES, TensorsReference
from tpm_fed.storage.atomic import write_chunks_atomically
from tpm_fed.storage.result_stores import connector_for, local_folder


def reachable(reference: TensorsReference) -> bool:
    """Whether this process can open the reference's store itself (a file store it can read)."""
    folder = local_folder(reference.store)
    return folder is not None and os.access(folder, os.R_OK | os.X_OK)


class StoreTensorReader:
    """Reads a result's tensors straight from their store (the service's bookkeeper gives results this one); not
    :class:`tpm_fed.storage.store_reader.StoreReader`, which reads model versions from the model store."""

    def chunks(self, request_id: str, reference: TensorsReference) -> Iterator[bytes | memoryview]:
        if not reachable(reference):
            raise ReferenceNotFound(f"request {request_id}: its tensors are in {reference.store}, which this "
                                    "process cannot read; read them with the Client that got the result")
        return get_chunks(connector_for(reference.store), reference)

    def save(self, path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> int:
        return write_chunks_atomically(path, chunks)


class ServiceReader:
    """Reads a reference from its store when reachable, else streams it from the service.

    Args:
        http: The client's ``httpx.Client`` (base URL and token set).
    """

    def __init__(self, http: Any) -> None:
        self._http = http

    def chunks(self, request_id: str, reference: TensorsReference) -> Iterator[bytes | memoryview]:
        if reachable(reference):
            return StoreTensorReader().chunks(request_id, reference)
        check_current(reference)
        return self._download(request_id, reference)

    def save(self, path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> int:
        return write_chunks_atomically(path, chunks)

    def _download(self, request_id: str, reference: TensorsReference) -> Iterator[bytes]:
        return checked(self._stream(request_id), reference, f"what the service sent for request {request_id}")

    def _stream(self, request_id: str) -> Iterator[bytes]:
        with self._http.stream("GET", f"/tpm/v1/requests/{request_id}/tensors") as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_body(response.status_code, _json_or_text(response))
            yield from response.iter_bytes(CHUNK_BYTES // 4)


def _json_or_text(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:2000], "code": f"HTTP{response.status_code}"}}
