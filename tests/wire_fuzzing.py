"""Hypothesis strategies for wire formats: arbitrary JSON, and valid documents bent out of shape.

Purely random JSON rarely gets past a format's first check, so most inputs
are *mutations* of a valid document: a few fields replaced by arbitrary
values, deleted, or joined by unknown ones, anywhere in the nesting. That
reaches the checks deep inside (a step's positions, a layer's width, a
site's endpoint id) as well as the outer ones.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# Values JSON can carry, plus the awkward corners: huge and negative numbers,
# NaN and infinities (Python's json writes them), control characters, and
# strings that look like numbers, booleans, paths or UUIDs.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "0", "-1", "1e309", "true", "null", "nan", "../..", "/", "\x00",
                       "00000000-0000-0000-0000-000000000000", "model.layers.0", "float32", "AAAA"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document a mutation can act on (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _parent(document: Any, path: tuple) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


@st.composite
def mutated(draw, valid: Any, max_mutations: int = 3) -> Any:
    """``valid`` with up to ``max_mutations`` fields replaced, deleted or added (possibly none)."""
    document = copy.deepcopy(valid)
    for _ in range(draw(st.integers(0, max_mutations))):
        path = draw(st.sampled_from(_paths(document)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                document = draw(json_values)
            continue
        parent, key = _parent(document, path), path[-1]
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        else:
            parent.insert(key, draw(json_values))
    return document


def valid_request_documents(model: str, version: str | None = None, site: str | None = None) -> dict[str, dict]:
    """A valid wire document of every request kind (and both embedding inputs) for the demo model
    (``encode``: for the default encoder, the one kind the demo model does not serve)."""
    from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME
    from tpm_fed.protocol.encoding import EncodeRequest
    from tpm_fed.protocol.interventions import Ablate, Add, Inject, Patch, Save, Scale, Set
    from tpm_fed.protocol.requests import EmbeddingRequest, GenerationRequest, TraceRequest
    from tpm_fed.protocol.tensors import TensorData

    hidden = [0.25] * 128  # the demo model's hidden size
    generate = GenerationRequest.create(["The telescope", "A star"], model, max_new_tokens=4,
                                        min_new_tokens=1, temperature=0.7, top_p=0.9, seed=3, stop=["."],
                                        project="tests", site=site, backend="torch")
    trace = TraceRequest.create(
        f"{model}@{version}" if version else model, prompts=["The telescope", "A star"], max_new_tokens=2,
        steps=[
            Save(point="model.layers.0", positions=[0, -1], name="first"),
            Set(point="model.layers.1.mlp.output", value=TensorData.of(hidden)),
            Add(point="model.layers.1", value=TensorData.of([hidden, hidden]), positions=[0, 1], prompts=[0]),
            Scale(point="model.layers.0.self_attn.heads[1]", factor=0.5),
            Ablate(point="model.layers.1.self_attn.heads[*]", generated=True),
            Patch(point="model.layers.0", source=0, prompts=[1], positions=[-1], source_positions=[-1]),
            Inject(point="model.layers.0", text="Paris", scale=2.0),
        ],
        logit_lens={"layers": [0, 1], "positions": [-1], "top_k": 3},
        attention_lens={"layers": [1], "heads": [0], "positions": [-1], "top_k": 2},
        attention_patterns={"layers": [0]},
    )
    embed_tensors = EmbeddingRequest.create(model, inputs=[TensorData.of([[0.5, 1.5], [2.0, -1.0]])],
                                            input_module="fingerprint@1", head="classifier", pool="mean")
    embed_texts = EmbeddingRequest.create(model, texts=["a protein", "a star"], pool="last")
    encode = EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=["a protein", "a star"], project="tests")
    return {"generate": generate.to_wire(), "trace": trace.to_wire(),
            "embed_tensors": embed_tensors.to_wire(), "embed_texts": embed_texts.to_wire(), "encode": encode.to_wire()}
