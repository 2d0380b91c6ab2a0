"""An optional piece that is not installed is named, with the extra that brings it, in one line."""

from __future__ import annotations

import importlib.util

import pytest

from tpm_fed.protocol.errors import MissingDependency
from tpm_fed.state import open_database


def test_a_database_url_whose_driver_is_missing_names_the_extra():
    assert importlib.util.find_spec("pg8000") is None  # a PostgreSQL driver this install does not have
    with pytest.raises(MissingDependency, match=r"'pg8000'.*pip install 'tpm-fed\[postgres\]'"):
        open_database("postgresql+pg8000://tpm@127.0.0.1:1/tpm")
