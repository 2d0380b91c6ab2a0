"""Requests are validated once, at the edge, with messages naming the field."""

from __future__ import annotations

import pytest

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import GenerationRequest, ModelRef


def test_defaults_and_wire_round_trip():
    request = GenerationRequest.create("The cell", "demo@abc", max_new_tokens=8, stop=["."])
    assert request.model == ModelRef(name="demo", version="abc")
    assert request.greedy
    assert GenerationRequest.from_wire(request.to_wire()) == request


def test_request_ids_are_unique():
    first = GenerationRequest.create("a", "m")
    second = GenerationRequest.create("a", "m")
    assert first.request_id != second.request_id


@pytest.mark.parametrize(
    ("prompts", "params", "field"),
    [
        ([], {}, "prompts"),
        (["fine", "  "], {}, "prompt 1 is empty"),
        ("x", {"max_new_tokens": 0}, "max_new_tokens"),
        ("x", {"max_new_tokens": -3}, "max_new_tokens"),
        ("x", {"temperature": -0.1}, "temperature"),
        ("x", {"temperature": float("inf")}, "temperature"),  # sampling would divide by it
        ("x", {"temperature": float("nan")}, "temperature"),
        ("x", {"top_p": 0.0}, "top_p"),
        ("x", {"top_p": 1.5}, "top_p"),
        ("x", {"seed": -1}, "seed"),
        ("x", {"stop": [""]}, "stop"),
        ("x", {"max_tokens": 5}, "max_tokens"),  # a typo is refused, not ignored
    ],
)
def test_bad_input_is_refused_naming_the_field(prompts, params, field):
    with pytest.raises(InvalidRequest, match=field):
        GenerationRequest.create(prompts, "m", **params)


@pytest.mark.parametrize("text", ["", "@v1", "name@"])
def test_bad_model_refs(text):
    with pytest.raises(InvalidRequest, match="model"):
        ModelRef.parse(text)


def test_model_ref_round_trips_as_text():
    assert str(ModelRef.parse("demo@1234")) == "demo@1234"
    assert ModelRef.parse("demo").version is None


def test_min_new_tokens_cannot_exceed_max():
    with pytest.raises(InvalidRequest, match="min_new_tokens"):
        GenerationRequest.create("x", "m", max_new_tokens=4, min_new_tokens=5)


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_an_injection_scale_that_is_not_finite_is_refused(scale):
    from tpm_fed.protocol.requests import TraceRequest

    inject = {"op": "inject", "point": "model.layers.1.self_attn", "text": " stars", "scale": scale}
    with pytest.raises(InvalidRequest, match="scale"):
        TraceRequest.create("m", prompts=["The cell"], steps=[inject])
