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


# -- traces whose points live on either stage ------------------------------------------------------

from tpm_fed.interventions import (  # noqa: E402
    Ablate, Add, FromSaved, Inject, LogitLens, Patch, Reduce, Save, SavedTerm, Scale, SessionStep, Set)
from tpm_fed.protocol.requests import TraceRequest  # noqa: E402
from tpm_fed.protocol.tensors import TensorData  # noqa: E402

CLEAN, CORRUPT = "The cell divides and the", "The star divides and the"
SECOND_STAGE = ["model.layers.2", "model.layers.3.mlp.input", "model.layers.3.self_attn.heads[1]",
                "model.layers.2.self_attn.heads[*]", "model.layers.3.post_attention_layernorm"]
FIRST_STAGE = ["model.embed_tokens", "model.layers.0", "model.layers.1.mlp", "model.norm", "lm_head"]


def _trace(backend, prompts, **fields):
    from functions.policy import WorkerPolicy

    tracer = backend.tracer
    request = TraceRequest.create("demo-llama", prompts=prompts, **fields)
    return tracer.execute(request, tracer.tokenize(request), policy=WorkerPolicy())


def _same(split_tensors, whole_tensors):
    assert split_tensors.keys() == whole_tensors.keys()
    for name, tensor in whole_tensors.items():
        assert split_tensors[name].dtype == tensor.dtype, name
        assert (split_tensors[name].float() - tensor.float()).abs().max().item() <= 1e-5, name


def test_saves_on_either_stage_equal_one_process(split, whole):
    steps = [Save(point=p) for p in FIRST_STAGE + SECOND_STAGE]
    (split_t, split_r), (whole_t, whole_r) = _trace(split, [CLEAN, "Stars"], steps=steps), \
        _trace(whole, [CLEAN, "Stars"], steps=steps)
    _same(split_t, whole_t)
    assert split_r["usage"] == whole_r["usage"]


def test_the_logit_lens_over_both_stages_equals_one_process(split, whole):
    lens = {"logit_lens": LogitLens(top_k=5, positions=[-1, 1])}
    (split_t, split_r), (whole_t, whole_r) = _trace(split, [CLEAN, "Stars"], **lens), \
        _trace(whole, [CLEAN, "Stars"], **lens)
    _same(split_t, whole_t)
    assert split_r["vocab"] == whole_r["vocab"]


def test_the_attention_lens_over_both_stages_equals_one_process(split, whole):
    from tpm_fed.interventions import AttentionLens

    for lens in (AttentionLens(layers=[1, 3, 2], positions=[-1, 0], top_k=4), AttentionLens(heads=[2, 0])):
        (split_t, split_r), (whole_t, whole_r) = _trace(split, [CLEAN, "Stars"], attention_lens=lens), \
            _trace(whole, [CLEAN, "Stars"], attention_lens=lens)
        _same(split_t, whole_t)
        assert split_r["vocab"] == whole_r["vocab"]


def test_a_patch_on_the_first_stage_changes_the_second_stages_output_as_on_one_process(split, whole):
    steps = [Patch(point="model.layers.1", source=0, positions=[1, 2]), Save(point="model.layers.3", prompts=[1]),
             Save(point="lm_head", prompts=[1])]
    split_t, _ = _trace(split, [CLEAN, CORRUPT], steps=steps)
    whole_t, _ = _trace(whole, [CLEAN, CORRUPT], steps=steps)
    plain_t, _ = _trace(split, [CLEAN, CORRUPT], steps=steps[1:])
    _same(split_t, whole_t)
    assert not torch_equal(split_t["1:lm_head.output"], plain_t["1:lm_head.output"])  # the patch did something


def test_edits_on_the_second_stage_at_every_generated_token_equal_one_process(split, whole):
    import torch

    value = TensorData.of((torch.arange(128, dtype=torch.float32) / 64).numpy())
    steps = [Set(point="model.layers.2.mlp", positions=[0], value=value),
             Add(point="model.layers.3", value=value, generated=True),
             Scale(point="model.layers.2.self_attn.heads[3]", factor=0.5, generated=True),
             Ablate(point="model.layers.3.self_attn.heads[0]", positions=[-1]),
             Inject(point="model.layers.2", text=" river", scale=2.0, positions=[-1]),
             Patch(point="model.layers.3.mlp.input", source=0, positions=[-1]),
             Save(point="model.layers.3", generated=True, reduce=Reduce(op="mean")),
             Save(point="model.layers.2.self_attn.heads[*]", name="heads", reduce=Reduce(op="norm"))]
    (split_t, split_r), (whole_t, whole_r) = (_trace(backend, [CLEAN, CORRUPT], steps=steps, max_new_tokens=6)
                                              for backend in (split, whole))
    _same(split_t, whole_t)
    assert split_r["completions"] == whole_r["completions"]


def test_a_session_steering_at_the_second_stage_equals_one_process(split, whole):
    from functions.interventions.session import run_session
    from functions.policy import WorkerPolicy
    from tpm_fed.protocol.sessions import SessionRequest

    session = SessionRequest.create("demo-llama", steps=[
        SessionStep(name="read", prompts=["the bright sky", "the dark sky"],
                    steps=[Save(point="model.layers.3", name="h", reduce=Reduce(op="mean"))]),
        SessionStep(name="steer", prompts=["The telescope observed the"], max_new_tokens=8,
                    steps=[Add(point="model.layers.2", generated=True, value_from=FromSaved(terms=[
                        SavedTerm(step="read", save="h", prompt=0, weight=4.0),
                        SavedTerm(step="read", save="h", prompt=1, weight=-4.0)]))])])
    split_t, split_r = run_session(split.tracer, session, policy=WorkerPolicy())
    whole_t, whole_r = run_session(whole.tracer, session, policy=WorkerPolicy())
    _same(split_t, whole_t)
    assert split_r["steps"][1]["completions"] == whole_r["steps"][1]["completions"]


def test_what_a_split_replica_cannot_trace_yet_is_refused_typed_and_it_serves_on(split, whole):
    from tpm_fed.interventions import AttentionPatterns

    with pytest.raises(InvalidRequest, match="split into pipeline stages"):
        _trace(split, [CLEAN], attention_patterns=AttentionPatterns())
    assert _answer(split, max_new_tokens=8) == _answer(whole, max_new_tokens=8)


def test_only_what_was_asked_for_crosses_stages(split):
    """A save of 2 rows at the second stage brings back those rows, not the hidden states of the pass."""
    from functions.multinode import wire

    seen = []
    original = wire.receive

    def spy(source):
        message = original(source)
        seen.append({name: tuple(t.shape) for name, t in message.tensors.items()})
        return message

    wire.receive = spy
    try:
        _trace(split, [CLEAN], steps=[Save(point="model.layers.3", positions=[0, -1])])
    finally:
        wire.receive = original
    assert seen[-1] == {"save/0:model.layers.3.output": (2, 128)}  # TRACE_END: the two rows asked for


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_the_core_on_callers_embeddings_crosses_both_stages_as_on_one_process(split, whole):
    """Mode 2 (``embed``): the core run on embeddings of uneven lengths, as the embed handler runs it."""
    import torch

    from functions.adapters.embed import _core

    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randn(length, 128, generator=generator) for length in (5, 2, 7)]
    with torch.no_grad():
        split_states, whole_states = _core(split.model, sequences), _core(whole.model, sequences)
    for mine, theirs in zip(split_states, whole_states, strict=True):
        assert (mine - theirs).abs().max().item() <= 1e-5


def test_streamed_text_of_two_stages_equals_one_process(split, whole):
    class Channel:  # the back channel's surface a backend uses (functions.streaming.BackChannel)
        def __init__(self):
            self.cancelled, self.sent = set(), []

        def send(self, deltas):
            self.sent.append(deltas)

    streamed = []
    request = GenerationRequest.create(PROMPTS, "demo-llama", max_new_tokens=10, stream=True)
    for backend in (split, whole):
        channel = Channel()
        backend.generate([backend.encode(request)], channel)
        streamed.append(channel.sent)
    assert streamed[0] == streamed[1] and len(streamed[0]) >= 10
