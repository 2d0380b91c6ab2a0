"""Scripts and workflows reach the service over HTTP: ``tpm_fed.Executor`` and the Parsl apps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tpm_fed import Executor
from tpm_fed.interventions import LogitLens, Save, SessionRequest, SessionStep, TraceRequest
from tpm_fed.protocol.requests import GenerationRequest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))


def test_executor_routes_requests_through_the_service(http_client, runtime):
    prompts = ["The cell", "The river carries", "The glacier", "The"]
    requests = [GenerationRequest.create(p, "demo-llama", max_new_tokens=8) for p in prompts]
    expected = [runtime.generate(p, max_new_tokens=8).result(timeout=120).token_ids for p in prompts]
    with Executor(client=http_client) as executor:
        single = executor.submit(requests[0]).result(timeout=120)
        assert single.token_ids == expected[0] and single.charge.project == "tests"
        again = [GenerationRequest.create(p, "demo-llama", max_new_tokens=8) for p in prompts]
        assert [r.token_ids for r in executor.map(again, timeout=120)] == expected
        with pytest.raises(TypeError, match="takes one request: GenerationRequest, TraceRequest"):
            executor.submit(print, "not a request")
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(requests[1])
    assert http_client.generate("The cell", max_new_tokens=2).result(timeout=120)  # the client it borrowed is open


def test_executor_without_a_client_reaches_the_service_named_by_the_environment(service, monkeypatch):
    monkeypatch.setenv("TPM_URL", service.url)
    monkeypatch.setenv("TPM_TOKEN", service.token)
    with Executor() as executor:
        result = executor.submit(GenerationRequest.create("The cell", "demo-llama", max_new_tokens=3)).result(120)
    assert result.usage.completion_tokens > 0 and result.charge.project == "tests"


def test_parsl_workflow_asks_analyses_and_aggregates(http_client, runtime):
    import parsl
    import workflow_example

    from tpm_fed import parsl as tpm_parsl

    tpm_parsl.use_client(http_client)
    try:
        with parsl.load(workflow_example.config()):
            topics = ["The cell", "The river", "The glacier"]
            summary = workflow_example.run(topics, "demo-llama", max_new_tokens=12)
            with pytest.raises(TypeError, match="takes a GenerationRequest"):
                tpm_parsl.generate("The cell")
            composed = workflow_example.analyse(
                "The cell", tpm_parsl.generate(GenerationRequest.create("The cell", "demo-llama", max_new_tokens=6))
            ).result(timeout=120)
            with pytest.raises(TypeError, match="takes a TraceRequest"):
                tpm_parsl.trace(GenerationRequest.create("The cell", "demo-llama"))
            lens = tpm_parsl.trace(TraceRequest.create("demo-llama", prompts=["The cell"], logit_lens=LogitLens()))
            traced = lens.result(timeout=120)
            batch_file = "\n".join(json.dumps({
                "custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": "demo-llama", "prompt": topic, "max_tokens": 4, "temperature": 0}})
                for i, topic in enumerate(topics)).encode()
            lines = tpm_parsl.batch(batch_file).result(timeout=300)
            stepped = tpm_parsl.session(SessionRequest.create("demo-llama", steps=[
                SessionStep(name="only", prompts=["The cell"], steps=[Save(point="model.layers.0")])])).result(120)
    finally:
        tpm_parsl.use_client(None)
    assert summary["answers"] == 3 and [r["topic"] for r in summary["rows"]] == topics
    version = runtime.catalog.resolve(runtime.default_model()).spec.version
    assert summary["versions"] == [version]
    assert summary["total_su"] > 0 and all(r["answer"] for r in summary["rows"])
    assert composed["topic"] == "The cell" and composed["version"] == version
    assert traced.logit_lens().ids.shape[0] == 4 and traced.version == version
    assert [line["custom_id"] for line in lines] == ["q0", "q1", "q2"]
    alone = http_client.generate(topics[1], max_new_tokens=4).result()
    assert lines[1]["response"]["body"]["choices"][0]["text"] == alone.texts[0]
    assert stepped.saved("only", "model.layers.0.output").shape[1] == 128
