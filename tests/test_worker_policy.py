"""A worker trusts only its endpoint: caller code, the adapter registry and result sizes are endpoint policy.

The serving function is called here as an outsider would call a registered
function: directly, on a real engine site, with task arguments claiming
permissions the endpoint never gave. Also here: the policy's own parsing,
the handler table against the kinds table, and backend capabilities.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest

from functions.backends.base import CAPABILITIES, Generates, HiddenStates, Traces, require_capability
from functions.handlers import HANDLERS
from functions.policy import WorkerPolicy, load_policy
from functions.serve import answer, serve_batch
from tpm_fed.federation import SiteConfig, WorkerSettings
from tpm_fed.interventions import PythonHook, Save, Scale, TraceRequest
from tpm_fed.protocol.adapter_architecture import Architecture, Linear
from tpm_fed.storage.adapter_registry import AdapterRegistry
from tpm_fed.protocol.entrypoints import SERVE_BATCH
from tpm_fed.protocol.errors import (
    BackendUnavailable, NotPermitted, PayloadTooLarge, SiteError, UnknownAdapter, error_from_wire,
)
from tpm_fed.protocol.kinds import KINDS, Capability
from tpm_fed.protocol.limits import MAX_RESULT_BYTES
from tpm_fed.protocol.requests import EmbeddingRequest, GenerationRequest, ModelRef
from tpm_fed.protocol.tensors import TensorData
from tpm_fed.protocol.versions import hash_model_dir
from tpm_fed.sites.local import LocalSite

PROMPT = "The telescope observed the"
CLAIMS = {"user_code": True, "adapters": "/somewhere"}
"""What an outsider's task may claim; a worker must take none of it."""


class LeavesAMark:
    """Caller "code" whose mere unpacking creates ``path`` (and yields an identity function).

    Unpickling runs ``eval`` on a string: exactly the reason a worker must
    refuse caller code before it deserializes anything.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.path!r}).touch() or (lambda tensor: tensor)",))


def marking_code(path: Path) -> str:
    from globus_compute_sdk.serialize import ComputeSerializer

    return ComputeSerializer().serialize(LeavesAMark(path))


def outcome_error(outcome: dict):
    assert "error" in outcome, outcome
    return error_from_wire(outcome["error"])


# -- the endpoint's policy, as its operator writes it ------------------------------------------


def test_unset_policy_runs_no_caller_code_and_has_no_registry():
    policy = load_policy({})
    assert policy == WorkerPolicy(allow_caller_code=False, adapter_registry=None, max_result_bytes=MAX_RESULT_BYTES)
    with pytest.raises(NotPermitted, match="TPM_ALLOW_CALLER_CODE=1"):
        policy.load_caller_code("never unpacked", "python_hooks")


def test_policy_from_variables_and_from_a_file(tmp_path):
    policy = load_policy({"TPM_ALLOW_CALLER_CODE": "1", "TPM_ADAPTER_REGISTRY": "/lab/adapters",
                          "TPM_MAX_RESULT_BYTES": "1000"})
    assert policy == WorkerPolicy(allow_caller_code=True, adapter_registry=Path("/lab/adapters"),
                                  max_result_bytes=1000)
    assert load_policy({"TPM_ALLOW_CALLER_CODE": "0"}).allow_caller_code is False
    assert load_policy({"TPM_ALLOW_CALLER_CODE": ""}).allow_caller_code is False  # empty is unset

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("allow_caller_code: true\nadapter_registry: /lab/adapters\n")
    assert load_policy({"TPM_WORKER_POLICY": str(policy_file)}) == WorkerPolicy(
        allow_caller_code=True, adapter_registry=Path("/lab/adapters"))
    policy_file.write_text('{"max_result_bytes": 2048}')  # JSON is YAML too
    assert load_policy({"TPM_WORKER_POLICY": str(policy_file)}).max_result_bytes == 2048


@pytest.mark.parametrize(("environ", "message"), [
    ({"TPM_ALLOW_CALLER_CODE": "maybe"}, "TPM_ALLOW_CALLER_CODE='maybe'"),
    ({"TPM_ADAPTER_REGISTRY": "store/adapters"}, "TPM_ADAPTER_REGISTRY='store/adapters'.*not an absolute path"),
    ({"TPM_MAX_RESULT_BYTES": str(MAX_RESULT_BYTES + 1)}, "TPM_MAX_RESULT_BYTES"),
    ({"TPM_MAX_RESULT_BYTES": "ten"}, "TPM_MAX_RESULT_BYTES='ten'"),
    ({"TPM_WORKER_POLICY": "/no/such/policy.yaml"}, "TPM_WORKER_POLICY=/no/such/policy.yaml"),
    ({"TPM_WORKER_POLICY": "/p.yaml", "TPM_ALLOW_CALLER_CODE": "1"}, "set one or the other"),
])
def test_a_malformed_policy_is_refused_naming_the_variable(environ, message):
    with pytest.raises(SiteError, match=message):
        load_policy(environ)


def test_a_policy_file_with_an_unknown_key_is_refused_naming_it(tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("allow_user_code: true\n")  # a typo must not be ignored
    with pytest.raises(SiteError, match="allow_user_code"):
        load_policy({"TPM_WORKER_POLICY": str(policy_file)})


def test_a_worker_with_a_malformed_policy_refuses_every_request_before_loading(monkeypatch, demo_model_dir):
    monkeypatch.setenv("TPM_ALLOW_CALLER_CODE", "yes please")
    spec = {"name": "demo-llama", "version": hash_model_dir(demo_model_dir), "path": str(demo_model_dir),
            "backend": "torch"}
    request = GenerationRequest.create(PROMPT, "demo-llama", max_new_tokens=2).to_wire()
    reply = serve_batch(spec, [request, request], {})
    errors = [outcome_error(outcome) for outcome in reply["outcomes"]]
    assert all(isinstance(e, SiteError) and "TPM_ALLOW_CALLER_CODE" in str(e) for e in errors)
    assert reply["replica"] is None  # refused before any model was loaded


# -- the outsider: serve_batch called directly on an engine site whose policy forbids caller code --


def test_an_outsider_claiming_caller_code_is_refused_before_it_is_unpacked_and_nothing_is_charged(runtime, tmp_path):
    site = runtime.site("local")  # the federation's shared (rcc) site: its policy forbids caller code
    spec = runtime.catalog.resolve(ModelRef(name="demo-llama")).spec
    hook_mark, module_mark = tmp_path / "hook-unpacked", tmp_path / "module-unpacked"
    trace = TraceRequest.create("demo-llama", prompts=[PROMPT], steps=[Save(point="model.layers.1")],
                                python_hooks=[PythonHook(point="model.layers.1", code=marking_code(hook_mark))])
    embed = EmbeddingRequest.create("demo-llama", inputs=[TensorData.of(np.ones((2, 4), np.float32))],
                                    input_code=marking_code(module_mark))
    generate = GenerationRequest.create(PROMPT, "demo-llama", max_new_tokens=3)
    ledger_before = (runtime.ledger.balances(), runtime.ledger.statement())

    reply = site.submit(SERVE_BATCH, spec.to_wire(), [trace.to_wire(), embed.to_wire(), generate.to_wire()],
                        CLAIMS).result(timeout=300)

    for outcome, what in zip(reply["outcomes"][:2], ("python_hooks", "input_code"), strict=True):
        error = outcome_error(outcome)
        assert isinstance(error, NotPermitted) and what in str(error) and "TPM_ALLOW_CALLER_CODE" in str(error)
    assert not hook_mark.exists() and not module_mark.exists()  # the caller's code was never unpacked
    assert "result" in reply["outcomes"][2]  # the rest of the batch is served
    assert (runtime.ledger.balances(), runtime.ledger.statement()) == ledger_before  # nothing charged

    # The payload is real: unpacked, it leaves its mark (here, in this process).
    from globus_compute_sdk.serialize import ComputeSerializer

    assert callable(ComputeSerializer().deserialize(marking_code(tmp_path / "control")))
    assert (tmp_path / "control").exists()


def test_an_outsider_cannot_point_the_worker_at_another_adapter_registry(runtime, tmp_path):
    import torch

    theirs = AdapterRegistry(tmp_path / "their-registry")
    architecture = Architecture(layers=[Linear(in_features=4, out_features=128)])
    record = theirs.register("planted-in", architecture, {"0.weight": torch.zeros(128, 4), "0.bias": torch.zeros(128)})
    spec = runtime.catalog.resolve(ModelRef(name="demo-llama")).spec
    embed = EmbeddingRequest.create("demo-llama", inputs=[TensorData.of(np.ones((2, 4), np.float32))],
                                    input_module=record.ref)
    reply = runtime.site("local").submit(
        SERVE_BATCH, spec.to_wire(), [embed.to_wire()], {"adapters": str(theirs.root)}
    ).result(timeout=300)
    error = outcome_error(reply["outcomes"][0])
    assert isinstance(error, UnknownAdapter) and "planted-in" in str(error)  # looked in its own registry


@pytest.fixture(scope="module")
def spec_wire(demo_model_dir) -> dict:
    return {"name": "demo-llama", "version": hash_model_dir(demo_model_dir), "path": str(demo_model_dir),
            "backend": "torch"}


@pytest.fixture(scope="module")
def forbidding_site_started_in_a_permissive_shell(tmp_path_factory):
    """A local site forbidding caller code, started while this process's environment allows everything.

    The site writes its workers' whole policy in their worker_init, so nothing
    leaks in from the environment of whoever starts it.
    """
    folder = tmp_path_factory.mktemp("forbidding")
    permissive = folder / "permissive.yaml"
    permissive.write_text("allow_caller_code: true\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TPM_ALLOW_CALLER_CODE", "1")
        patch.setenv("TPM_WORKER_POLICY", str(permissive))
        site = LocalSite("forbidding", folder / "run", allow_caller_code=False)
        site.start()
    yield site
    site.shutdown()


def test_a_local_sites_policy_does_not_leak_from_the_shell_that_started_it(
        forbidding_site_started_in_a_permissive_shell, spec_wire, tmp_path):
    mark = tmp_path / "unpacked"
    trace = TraceRequest.create("demo-llama", prompts=[PROMPT],
                                python_hooks=[PythonHook(point="model.layers.1", code=marking_code(mark))])
    reply = forbidding_site_started_in_a_permissive_shell.submit(
        SERVE_BATCH, spec_wire, [trace.to_wire()], CLAIMS).result(timeout=300)
    assert isinstance(outcome_error(reply["outcomes"][0]), NotPermitted)
    assert not mark.exists()


@pytest.fixture(scope="module")
def byo_site(tmp_path_factory):
    """A site whose operator runs callers' code: a project's own (byo) site."""
    config = SiteConfig(name="lab", billing="byo", owner="lab-group")
    site = LocalSite.from_config(config, tmp_path_factory.mktemp("byo") / "run")
    assert site.allow_caller_code
    yield site
    site.shutdown()


def test_a_byo_worker_runs_the_callers_hook(byo_site, spec_wire, tmp_path):
    hooked = TraceRequest.create("demo-llama", prompts=[PROMPT], steps=[Save(point="lm_head")],
                                 python_hooks=[PythonHook.of("model.layers.1", lambda tensor: tensor * 2)])
    declared = TraceRequest.create("demo-llama", prompts=[PROMPT],
                                   steps=[Scale(point="model.layers.1", factor=2.0), Save(point="lm_head")])
    mark = tmp_path / "unpacked"
    marked = TraceRequest.create("demo-llama", prompts=[PROMPT],
                                 python_hooks=[PythonHook(point="model.layers.1", code=marking_code(mark))])
    reply = byo_site.submit(SERVE_BATCH, spec_wire, [hooked.to_wire(), declared.to_wire(), marked.to_wire()],
                            {}).result(timeout=300)
    results = [outcome["result"] for outcome in reply["outcomes"]]
    import base64

    from tpm_fed.protocol.tensors import unpack_tensors

    # The reply is JSON data: a tensor blob travels as base64 text.
    by_hook, by_spec = (unpack_tensors(base64.urlsafe_b64decode(r["tensors_blob"]))["0:lm_head.output"] for r in results[:2])
    assert np.array_equal(by_hook, by_spec)  # the caller's hook ran, and did what it says
    assert mark.exists()  # unpacked here: this endpoint's operator allows caller code


# -- one handler per kind, backends by capability -----------------------------------------------


def test_every_kind_has_one_handler_and_every_capability_one_protocol():
    assert set(HANDLERS) == set(KINDS)
    assert set(CAPABILITIES) == set(typing.get_args(Capability))
    assert {kind.capability for kind in KINDS.values()} <= set(CAPABILITIES)


class _GeneratesOnly:
    """A backend that generates and can do nothing else (as vLLM's)."""

    name = "fake"
    context_length = 64

    def encode(self, request):
        from functions.backends.base import EncodedRequest

        return EncodedRequest(request=request, prompt_ids=[[1, 2, 3] for _ in request.prompts])

    def generate(self, batch):
        from tpm_fed.protocol.results import Completion

        return [[Completion(text="ok", token_ids=[7], finish_reason="length") for _ in item.prompt_ids]
                for item in batch]

    def close(self):
        pass


def test_a_backend_without_the_capability_is_refused_and_the_rest_served():
    backend = _GeneratesOnly()
    assert isinstance(backend, Generates) and not isinstance(backend, Traces | HiddenStates)
    trace = TraceRequest.create("m", prompts=[PROMPT]).to_wire()
    embed = EmbeddingRequest.create("m", texts=[PROMPT]).to_wire()
    generate = GenerationRequest.create(PROMPT, "m", max_new_tokens=1).to_wire()
    outcomes = answer(backend, [trace, generate, embed], WorkerPolicy())
    for outcome, capability in ((outcomes[0], "trace"), (outcomes[2], "hidden_states")):
        error = outcome_error(outcome)
        assert isinstance(error, BackendUnavailable) and capability in str(error) and "fake" in str(error)
    assert outcomes[1]["result"]["completions"][0]["text"] == "ok"
    with pytest.raises(BackendUnavailable):
        require_capability(backend, "trace", "trace")


def test_the_torch_backend_has_every_capability_of_the_kinds_it_serves(reference_model):
    from functions.backends.torch_backend import TorchBackend

    model, tokenizer = reference_model
    backend = TorchBackend(model, tokenizer)
    served = {kind.capability for kind in KINDS.values() if "torch" in kind.backends}
    assert served == {"generate", "trace", "hidden_states"}
    assert all(isinstance(backend, CAPABILITIES[capability]) for capability in served)
    assert not isinstance(backend, CAPABILITIES["encode"])  # encoders are their own backend


def test_caller_code_is_checked_before_it_is_unpacked_in_traces_and_embeddings(reference_model, tmp_path):
    from functions.backends.torch_backend import TorchBackend

    model, tokenizer = reference_model
    backend = TorchBackend(model, tokenizer)
    marks = [tmp_path / "hook", tmp_path / "input", tmp_path / "head"]
    requests = [
        TraceRequest.create("m", prompts=[PROMPT], python_hooks=[PythonHook(point="model.layers.1",
                                                                            code=marking_code(marks[0]))]),
        EmbeddingRequest.create("m", inputs=[TensorData.of(np.ones((2, 4), np.float32))],
                                input_code=marking_code(marks[1])),
        EmbeddingRequest.create("m", texts=[PROMPT], head_code=marking_code(marks[2])),
    ]
    wire = [request.to_wire() for request in requests]
    for outcome in answer(backend, wire, WorkerPolicy()):
        assert isinstance(outcome_error(outcome), NotPermitted)
    assert not any(mark.exists() for mark in marks)
    allowed = answer(backend, wire, WorkerPolicy(allow_caller_code=True))
    assert all(mark.exists() for mark in marks)
    assert "result" in allowed[0] and "result" in allowed[2]  # an identity hook, an identity head
    assert "[2, 4]" in str(outcome_error(allowed[1]))  # an identity input module makes no embeddings


def test_the_endpoints_result_limit_applies(reference_model):
    from functions.interventions.tracer import Tracer

    model, tokenizer = reference_model
    tracer = Tracer(model, tokenizer, 256, {2}, 0)
    request = TraceRequest.create("m", prompts=[PROMPT], steps=[Save(point="lm_head")])
    assert tracer.run(request, policy=WorkerPolicy())["tensors_blob"]
    with pytest.raises(PayloadTooLarge, match="at most 1,000"):
        tracer.run(request, policy=WorkerPolicy(max_result_bytes=1000))


# -- the federation's settings for a local site ------------------------------------------------


def test_local_sites_run_caller_code_only_where_the_operator_says(tmp_path):
    rcc = LocalSite.from_config(SiteConfig(name="shared"), tmp_path)
    byo = LocalSite.from_config(SiteConfig(name="lab", billing="byo", owner="lab-group"), tmp_path)
    closed_byo = LocalSite.from_config(SiteConfig(name="lab", billing="byo", owner="lab-group",
                                                  worker=WorkerSettings(allow_caller_code=False)), tmp_path)
    assert (rcc.allow_caller_code, byo.allow_caller_code, closed_byo.allow_caller_code) == (False, True, False)
    assert "export TPM_ALLOW_CALLER_CODE=0" in rcc.worker_init()
    assert "export TPM_ALLOW_CALLER_CODE=1" in byo.worker_init()
    with pytest.raises(ValueError, match="worker settings are for local sites"):
        SiteConfig(name="far", access="parsl", engine_config=Path("x.yaml"),
                   worker=WorkerSettings(allow_caller_code=True))


def test_the_adapter_registry_defaults_to_the_federations_store(tmp_path):
    from tpm_fed.federation import Federation

    (tmp_path / "federation.yaml").write_text(
        "sites:\n  - {name: local}\n  - {name: other, worker: {adapter_registry: shared/adapters}}\n")
    federation = Federation.load(tmp_path / "federation.yaml")
    local, other = (LocalSite.from_config(site, tmp_path / "run") for site in federation.sites)
    assert local.adapter_registry == (tmp_path / "store" / "adapters").resolve()
    assert other.adapter_registry == (tmp_path / "shared" / "adapters").resolve()
    assert f"export TPM_ADAPTER_REGISTRY={local.adapter_registry}" in local.worker_init()
