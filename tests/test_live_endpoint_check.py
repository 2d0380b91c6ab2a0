"""scripts/live_endpoint.py compares the token ids a Parsl-run batch served, and fails when they differ."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "live_endpoint.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("live_endpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served(*token_ids: list[int]) -> dict:
    """An outcome as serve_batch returns it for a generate request."""
    return {"result": {"completions": [{"text": "t", "token_ids": ids, "finish_reason": "length"} for ids in token_ids],
                       "usage": {"prompt_tokens": 2, "completion_tokens": 4}}}


def test_the_same_tokens_pass(script):
    assert script.same_tokens(served([5, 6, 7], [8, 9]), served([5, 6, 7], [8, 9]))[0]


@pytest.mark.parametrize("got", [
    served([5, 6, 8], [8, 9]),  # one token differs
    served([5, 6, 7]),  # a completion missing
    served([8, 9], [5, 6, 7]),  # in another order
    {"error": {"type": "ModelLoadError", "message": "no"}},  # no tokens at all
    {"result": {"token_ids": [5, 6, 7]}},  # the key the old check read: served results do not have it
])
def test_different_or_missing_tokens_fail(script, got):
    same, detail = script.same_tokens(served([5, 6, 7], [8, 9]), got)
    assert not same and detail


def test_two_outcomes_without_tokens_do_not_pass(script):
    assert not script.same_tokens({"result": {}}, {"result": {}})[0]
