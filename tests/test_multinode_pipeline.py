"""A replica split into 2 pipeline stages over 2 processes (gloo on CPU) answers as one process does.

Oracle: the same model version on the one-process torch backend, called directly.
"""

from __future__ import annotations

import pytest

from functions.backends import choose_backend, load_backend
from functions.backends.torch_backend import TorchBackend
from functions.multinode.stages import StagePlan
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.protocol.versions import hash_model_dir

PROMPTS = ["The cell divides", "A river carries the", "Stars"]


def _spec(model_dir, stages: int) -> ModelSpec:
    return ModelSpec(name="demo-llama", version=hash_model_dir(model_dir), path=str(model_dir), backend="auto",
                     pipeline_parallel_size=stages)


@pytest.fixture(scope="module")
def split(demo_model_dir):
    backend = load_backend(_spec(demo_model_dir, 2), choose_backend(_spec(demo_model_dir, 2))[0])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def whole(demo_model_dir):
    return TorchBackend.load(_spec(demo_model_dir, 1))


def _answer(backend, **fields):
    request = GenerationRequest.create(PROMPTS, "demo-llama", **fields)
    return [completion.token_ids for completion in backend.generate([backend.encode(request)])[0]]


def test_a_split_model_runs_on_the_pipeline_backend_across_two_ranks(split, demo_model_dir):
    assert type(split).__name__ == "PipelineBackend"
    assert split.stages == 2 and len(split.launcher.pids()) == 1
    assert choose_backend(_spec(demo_model_dir, 2))[0] == "torch"
    # Rank 0 holds only its own layers' weights: the later stage's are not in this process.
    names = {name for name, _ in split.model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(name.startswith("model.layers.2.") for name in names)


def test_greedy_tokens_of_two_stages_equal_one_process(split, whole):
    assert _answer(split, max_new_tokens=24) == _answer(whole, max_new_tokens=24)


def test_a_seeded_sample_of_two_stages_equals_one_process(split, whole):
    sampled = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    assert _answer(split, **sampled) == _answer(whole, **sampled)


def test_the_layers_are_cut_evenly_and_a_point_names_its_stage():
    plan = StagePlan.even(30, 4)
    assert plan.bounds == (0, 8, 16, 23, 30)
    assert plan.stage_of("model.layers.7.mlp.down_proj") == 0
    assert plan.stage_of("model.layers.8") == 1
    assert plan.stage_of("model.layers.29.self_attn") == 3
    assert plan.stage_of("model.norm") == 0 and plan.stage_of("lm_head") == 0
    assert plan.holds(0, "lm_head.weight") and not plan.holds(1, "lm_head.weight")
    with pytest.raises(InvalidRequest):
        StagePlan.even(2, 3)
