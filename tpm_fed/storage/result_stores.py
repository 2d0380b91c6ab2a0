"""A result store spec as a ProxyStore connector (results by reference, :mod:`tpm_fed.protocol.references`).

A spec is one string, so an endpoint operator can set it in a worker's
environment (``TPM_RESULT_STORE``) and the federation file can name the same
store for the service:

- ``file:///abs/path`` or ``/abs/path``: ProxyStore's ``FileConnector`` on a
  file system the site and its readers share (the embedded default: a folder
  under the home). The folder is made private to its owner.
- ``redis://host:port``: ProxyStore's ``RedisConnector`` (needs ``redis``).

Other ProxyStore connectors (Globus Transfer, endpoint to endpoint) fit the
same two calls, ``put`` and ``get``, and can be added here by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tpm_fed.protocol.errors import InvalidRequest


def check_spec(spec: str) -> str:
    """``spec``, if it names a store this module can open.

    Raises:
        InvalidRequest: Not a ``file`` path or a ``redis`` address.
    """
    _parse(spec)
    return spec


def connector_for(spec: str, *, create: bool = False) -> Any:
    """The ProxyStore connector ``spec`` names (imported here, never at start-up).

    Args:
        spec: ``file:///path``, ``/path`` or ``redis://host:port``.
        create: Make a file store's folder (mode 0700) if it is missing; readers
            leave it alone, so a missing store reads as missing, not as empty.
    """
    kind, location = _parse(spec)
    if kind == "file":
        from proxystore.connectors.file import FileConnector

        if create and not os.path.isdir(location):
            os.makedirs(location, mode=0o700, exist_ok=True)
        # clear=False: closing a connector must never delete the store's folder.
        return FileConnector(location, clear=False)
    from proxystore.connectors.redis import RedisConnector

    return RedisConnector(location[0], location[1])


def key_for(connector: Any, name: str) -> Any:
    """The connector's own key type for a chunk named ``name`` (every ProxyStore key here is one string)."""
    return type(connector.new_key())(name)


def key_name(key: Any) -> str:
    return str(key[0])


def local_folder(spec: str) -> Path | None:
    """The folder of a file store, or None for any other kind."""
    kind, location = _parse(spec)
    return Path(location) if kind == "file" else None


def _parse(spec: str) -> tuple[str, Any]:
    if spec.startswith("/"):
        return "file", os.path.normpath(spec)
    parsed = urlparse(spec)
    if parsed.scheme == "file" and parsed.path.startswith("/") and not parsed.netloc:
        return "file", os.path.normpath(parsed.path)
    if parsed.scheme == "redis" and parsed.hostname and parsed.port:
        return "redis", (parsed.hostname, parsed.port)
    raise InvalidRequest(f"result store {spec!r}: expected file:///absolute/path or redis://host:port")
