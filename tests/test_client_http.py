"""``tpm_fed.Client`` over HTTP: the same results and the same typed errors as the runtime itself."""

from __future__ import annotations

import numpy as np
import pytest

from tpm_fed.interventions import LogitLens, Save
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, UnknownModel
from tpm_fed.protocol.requests import GenerationRequest


def test_generation_over_http_equals_the_runtime_in_process(http_client, runtime):
    prompts = ["The cell", "A scientist can reproduce a result when"]
    remote = http_client.generate(prompts, max_new_tokens=12).result(timeout=120)
    local = runtime.generate(prompts, max_new_tokens=12).result(timeout=120)
    assert remote.token_ids == local.token_ids and remote.version == local.version
    assert remote.charge.charged_su > 0 and remote.charge.project == "tests"


def test_trace_tensors_cross_http_bit_for_bit(http_client, runtime):
    ask = {"steps": [Save(point="model.layers.1")], "logit_lens": LogitLens(top_k=3)}
    remote = http_client.trace("The river carries", **ask).result(timeout=120)
    local = runtime.trace("The river carries", **ask).result(timeout=120)
    assert np.array_equal(remote.saved("model.layers.1.output"), local.saved("model.layers.1.output"))
    assert np.array_equal(remote.logit_lens().ids, local.logit_lens().ids)
    assert remote.usage.activation_bytes == local.usage.activation_bytes > 0


def test_refusals_come_back_as_the_same_typed_errors(http_client, runtime):
    with pytest.raises(InvalidRequest):
        http_client.generate("The cell", max_new_tokens=0)  # checked here, before any HTTP
    assert isinstance(http_client.generate("x", model="no-such-model").exception(60), UnknownModel)
    assert isinstance(http_client.generate("x", project="not-mine").exception(60), NotPermitted)
    with pytest.raises(InvalidRequest, match="expected a tpm-fed request"):
        http_client.submit("The cell")


def test_the_service_answers_what_it_knows_about_the_caller(http_client, runtime):
    result = http_client.submit(GenerationRequest.create("The cell", "demo-llama", max_new_tokens=2)).result(120)
    record = http_client.request(result.request_id)
    assert record["status"] == "done" and record["identity"] == runtime.owner and record["version"] == result.version
    assert any(c["request_id"] == result.request_id for c in http_client.usage("tests"))
    (allocation,) = http_client.allocations("tests")
    assert allocation["granted_su"] == 1e6 and allocation["spent_su"] > 0
    assert http_client.whoami() == {"identity": runtime.owner, "projects": ["tests"], "operator": False}
    assert http_client.points("demo-llama").layers == runtime.points("demo-llama").layers
