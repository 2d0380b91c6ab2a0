"""Functions the tests send through a site (importable by the workers)."""

from __future__ import annotations

import os


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def worker_pid() -> int:
    return os.getpid()


def big_result(nbytes: int) -> str:
    return "x" * nbytes  # a site carries results as JSON: text, not bytes
