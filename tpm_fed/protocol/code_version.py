"""Which code a worker runs: the version that ties a registered function to its code.

Globus Compute stores a registered function by name (``functions.serve``
``serve_batch``); what runs is whatever tpm-fed the endpoint has installed.
The serving code version is a hash of the sources of exactly what crosses
the wire and what runs there: the contract (``tpm_fed.protocol``), the storage
both ends share (``tpm_fed.storage``) and the worker (``functions``). Editing the CLI, the broker or the docs leaves it
unchanged, so registered ids stay valid. ``tpm functions register`` records
it beside the function id; a site refuses to submit once the serving code
has changed (register again), and the worker refuses a batch whose client
expects code other than its own (install the same tpm-fed at the endpoint).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

SERVING_PACKAGES = ("tpm_fed.protocol", "tpm_fed.storage", "functions")


@functools.cache
def serving_code_version() -> str:
    """SHA-256 (16 hex digits) of every ``.py`` file of :data:`SERVING_PACKAGES`, by relative path."""
    digest = hashlib.sha256()
    for package in SERVING_PACKAGES:
        root = package_root(package)
        for source in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{source.relative_to(root).as_posix()}\0".encode())
            digest.update(source.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def package_root(package: str) -> Path:
    """The folder of ``package``, found without importing it (the worker is never imported here)."""
    top, _, rest = package.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {top!r} is not importable here")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*rest.split(".") if rest else [])
