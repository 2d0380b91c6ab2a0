"""Property-based fuzzing of every wire format: a valid value or a typed error, nothing else.

Each format is fed valid documents bent out of shape (tests/wire_fuzzing.py)
and arbitrary JSON. What must hold for every input:

- requests of every kind (``request_from_wire``, what a worker and the
  service parse) and their intervention specs (checked against the demo
  model's point catalog, as the client does before anything is reserved):
  a request, or a :class:`TpmError`; an accepted request crosses the wire
  and comes back equal;
- adapter architectures: pydantic's ``ValidationError`` for a malformed
  document (the service answers it 400), then only ``AdapterMismatch``;
- federation files (``Federation.load``): a federation, or
  ``FederationConfigError``;
- the endpoint's worker policy (``load_policy``, from variables or a file):
  a policy, or ``SiteError``; and caller code is allowed only by a value
  that clearly says so.

Example counts are modest (the machine is small); ``derandomize`` keeps the
examples the same on every run, so a failure here is reproducible.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.wire_fuzzing import json_values, mutated, valid_request_documents
from tpm_fed.protocol.errors import AdapterMismatch, FederationConfigError, SiteError, TpmError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def outcome(parse):
    """What ``parse()`` gave: ``(value, None)`` or ``(None, error)``; an untyped error fails the test."""
    try:
        return parse(), None
    except TpmError as error:
        return None, error


# -- requests of every kind, and intervention specs -------------------------------


VALID_REQUESTS = valid_request_documents("demo-llama", version="abc", site="local")
# Mappings only: a wire request that is not a mapping at all is the known bug pinned below.
request_documents = (
    st.sampled_from(sorted(VALID_REQUESTS)).flatmap(lambda k: mutated(VALID_REQUESTS[k]))
    | st.dictionaries(st.sampled_from(["kind", "model", "prompts", "texts", "steps"]), json_values, max_size=4)
).filter(lambda document: isinstance(document, dict))


@pytest.fixture(scope="module")
def demo_points():
    """The demo model's point catalog, probed from its architecture alone (no training, no weights)."""
    from tpm_fed.models.demo import DemoModelRecipe
    from tpm_fed.protocol.points import catalog_from_config

    recipe = DemoModelRecipe()
    return catalog_from_config(None, {
        "model_type": "llama", "vocab_size": recipe.vocab_size, "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size, "num_hidden_layers": recipe.layers,
        "num_attention_heads": recipe.heads, "num_key_value_heads": recipe.heads,
        "max_position_embeddings": recipe.context,
    })


def test_the_valid_documents_are_valid(demo_points):
    """The fuzzers start from documents that pass every check (else mutations prove little)."""
    from tpm_fed.protocol.kinds import request_from_wire
    from tpm_fed.protocol.validation import check_trace

    for document in VALID_REQUESTS.values():
        assert request_from_wire(document).to_wire() == document
    check_trace(request_from_wire(VALID_REQUESTS["trace"]), demo_points, "float32")


@FUZZ
@given(document=request_documents)
def test_requests_of_every_kind_parse_or_refuse_typed(document, demo_points):
    from tpm_fed.protocol.kinds import request_from_wire
    from tpm_fed.protocol.requests import TraceRequest
    from tpm_fed.protocol.validation import check_trace

    request, _ = outcome(lambda: request_from_wire(document))
    if request is None:
        return
    assert request_from_wire(json.loads(json.dumps(request.to_wire()))) == request  # it crosses the wire
    bound = request.usage_bound()
    assert bound.prompt_tokens >= 0 and bound.completion_tokens >= 0
    if isinstance(request, TraceRequest):
        checked, _ = outcome(lambda: check_trace(request, demo_points, "float32"))
        assert checked is None or checked.result_bytes >= 0


@pytest.mark.parametrize("document", [None, ["generate"], "generate", 7])
def test_a_request_that_is_not_a_mapping_is_refused_typed(document):
    from tpm_fed.protocol.errors import InvalidRequest
    from tpm_fed.protocol.kinds import request_from_wire

    with pytest.raises(InvalidRequest):
        request_from_wire(document)


# -- adapter architectures ------------------------------------------------------------

VALID_ARCHITECTURE = {"layers": [
    {"type": "linear", "in_features": 16, "out_features": 64, "bias": True},
    {"type": "activation", "function": "gelu"},
    {"type": "layer_norm", "features": 64, "eps": 1e-5},
    {"type": "conv1d", "in_channels": 64, "out_channels": 256, "kernel_size": 3},
    {"type": "unflatten", "tokens": 2},
    {"type": "linear", "in_features": 128, "out_features": 128, "bias": False},
]}


@FUZZ
@given(document=mutated(VALID_ARCHITECTURE) | json_values)
def test_adapter_architectures_build_or_refuse_typed(document):
    from tpm_fed.protocol.adapter_architecture import Architecture

    try:
        architecture = Architecture.model_validate(document)
    except ValidationError:
        return
    try:
        width = architecture.out_features
    except AdapterMismatch:
        return
    assert width > 0 and architecture.in_features > 0
    expected = architecture.expected_tensors()
    architecture.check_weights(expected)  # its own tensors always fit
    if expected:
        name = sorted(expected)[0]
        with pytest.raises(AdapterMismatch, match=name.replace(".", r"\.")):
            architecture.check_weights({**expected, name: (*expected[name], 1)})
    assert Architecture.model_validate_json(architecture.model_dump_json()) == architecture


# -- federation files --------------------------------------------------------------------


def _valid_federation() -> dict:
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig

    return Federation(
        name="fuzz",
        sites=[SiteConfig(name="local"),
               SiteConfig(name="gc", access="globus-compute", endpoint_id=uuid.UUID(int=7), cold_start_s=1.0,
                          user_endpoint_config={"account": "m0000"}, resource_specification={"priority": 1})],
        models=[ModelConfig(name="demo-llama", path=Path("models/demo-llama"), backend="torch",
                            kinds=["generate", "trace"])],
        projects=[ProjectConfig(name="tests", members=["alice"], allocations={"local": 10.0, "gc": 5.0})],
    ).model_dump(mode="json", exclude_defaults=True)


VALID_FEDERATION = _valid_federation()
federation_texts = (
    mutated(VALID_FEDERATION).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))
    # YAML reads JSON too (NaN and Infinity included); characters as UTF-8, not \u escapes (see below)
    | mutated(VALID_FEDERATION).map(lambda doc: json.dumps(doc, ensure_ascii=False))
    | st.text(max_size=80)
).map(str.encode)


@FUZZ
@given(text=federation_texts)
def test_federation_files_load_or_refuse_typed(text, tmp_path_factory):
    from tpm_fed.federation import Federation

    path = tmp_path_factory.mktemp("federation") / "federation.yaml"
    path.write_bytes(text)
    federation, _ = outcome(lambda: Federation.load(path))
    if federation is None:
        return
    again = path.parent / "again.yaml"
    federation.dump(again)
    assert Federation.load(again) == federation  # what loads, dumps and loads back the same


# Found by this fuzzer (reported, not fixed here: the file belongs to another change):
# bytes that are not UTF-8 escape as a bare UnicodeDecodeError. Strict, so the
# mark must go once the file's reader refuses them typed.
NOT_UTF8 = b"\x80federation"


def test_a_federation_file_that_is_not_utf8_is_refused_typed(tmp_path):
    from tpm_fed.federation import Federation

    (tmp_path / "federation.yaml").write_bytes(NOT_UTF8)
    with pytest.raises(FederationConfigError):
        Federation.load(tmp_path / "federation.yaml")


def test_a_federation_file_with_an_escaped_emoji_reads_the_emoji(tmp_path):
    from tpm_fed.federation import Federation

    document = {**VALID_FEDERATION, "name": "fuzz \U0001F600"}
    (tmp_path / "federation.yaml").write_text(json.dumps(document))  # ensure_ascii: "\ud83d\ude00"
    assert Federation.load(tmp_path / "federation.yaml").name == "fuzz \U0001F600"


# -- the endpoint's worker policy ------------------------------------------------------

TRUTHY = {"1", "true", "t", "yes", "y", "on"}  # what pydantic reads as True, in any case
policy_values = st.sampled_from(["", "0", "1", "true", "True", "yes", "no", "off", "tru", "2", " 1", "/srv/a",
                                 "relative/path", "10", "-5", "1e3", "99999999999"]) | st.text(max_size=10)


@FUZZ
@given(environ=st.dictionaries(st.sampled_from(["TPM_ALLOW_CALLER_CODE", "TPM_ADAPTER_REGISTRY",
                                                "TPM_MAX_RESULT_BYTES", "UNRELATED"]), policy_values))
def test_endpoint_policy_from_variables_is_a_policy_or_refused_typed(environ):
    from functions.policy import load_policy

    policy, _ = outcome(lambda: load_policy(environ))
    if policy is None:
        return
    if policy.allow_caller_code:  # a typo must never open the door to caller code
        assert environ["TPM_ALLOW_CALLER_CODE"].strip().lower() in TRUTHY
    if policy.adapter_registry is not None:
        assert policy.adapter_registry.is_absolute()


VALID_POLICY = {"allow_caller_code": False, "adapter_registry": "/srv/tpm/adapters", "max_result_bytes": 1000}
policy_files = (
    mutated(VALID_POLICY).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode())
    | mutated(VALID_POLICY).map(lambda doc: json.dumps(doc).encode())
    | st.text(max_size=40).map(str.encode)
)


@FUZZ
@given(content=policy_files)
def test_endpoint_policy_files_are_a_policy_or_refused_typed(content, tmp_path_factory):
    from functions.policy import load_policy

    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_bytes(content)
    policy, error = outcome(lambda: load_policy({"TPM_WORKER_POLICY": str(path)}))
    assert policy is not None or isinstance(error, SiteError)
    if policy is not None and policy.allow_caller_code:
        assert yaml.safe_load(content)["allow_caller_code"] in (True, 1, "1", "true", "yes", "on", "True")
    if policy is not None:
        assert 1 <= policy.max_result_bytes and not math.isnan(policy.max_result_bytes)


def test_a_policy_file_that_is_not_utf8_is_refused_typed(tmp_path):
    from functions.policy import load_policy

    (tmp_path / "policy.yaml").write_bytes(NOT_UTF8)
    with pytest.raises(SiteError):
        load_policy({"TPM_WORKER_POLICY": str(tmp_path / "policy.yaml")})


def test_a_missing_policy_file_is_refused_typed(tmp_path):
    from functions.policy import load_policy

    with pytest.raises(SiteError, match="TPM_WORKER_POLICY"):
        load_policy({"TPM_WORKER_POLICY": str(tmp_path / "absent.yaml")})
