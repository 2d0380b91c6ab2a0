"""Sessions: several traces on one replica in one placement, later steps using what earlier ones saved."""

from __future__ import annotations

import pytest
import torch

from tpm_fed.interventions import Add, FromSaved, Reduce, Save, SavedTerm, SessionStep, Set
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.sessions import MAX_SESSION_STEPS, SessionRequest
from tpm_fed.protocol.tensors import TensorData

PROMPT = "The telescope observed the"
POSITIVE, NEGATIVE = "the bright sky", "the dark sky"  # one token count: no padding in their batch
LAYER = "model.layers.1"


def steering_session(weight: float = 4.0) -> list[SessionStep]:
    """Read a layer for two prompts (mean over positions), then generate with their difference added."""
    return [
        SessionStep(name="read", prompts=[POSITIVE, NEGATIVE],
                    steps=[Save(point=LAYER, name="h", reduce=Reduce(op="mean"))]),
        SessionStep(name="steer", prompts=[PROMPT], max_new_tokens=8,
                    steps=[Add(point=LAYER, generated=True, value_from=FromSaved(terms=[
                        SavedTerm(step="read", save="h", prompt=0, weight=weight),
                        SavedTerm(step="read", save="h", prompt=1, weight=-weight)]))]),
    ]


def test_a_steering_vector_session_equals_the_same_computation_by_hand(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.session(steering_session()).result()

    pair = torch.tensor([tokenizer(POSITIVE)["input_ids"], tokenizer(NEGATIVE)["input_ids"]])
    captured = {}
    handle = model.get_submodule(LAYER).register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    try:
        with torch.no_grad():
            model(input_ids=pair)
    finally:
        handle.remove()
    means = captured["h"].float().mean(dim=1)
    steer = means[0] * 4.0 + means[1] * -4.0
    handle = model.get_submodule(LAYER).register_forward_hook(lambda m, a, out: out + steer)
    try:
        ids = tokenizer(PROMPT, return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.input_ids.shape[1]:]
    finally:
        handle.remove()

    assert torch.equal(torch.from_numpy(result.saved("read", "h", 0)), means[0])
    steered = result.step("steer").completions[0].token_ids
    assert steered == [t for t in expected.tolist() if t != tokenizer.eos_token_id][:8]
    plain = runtime.generate(PROMPT, max_new_tokens=8).result()
    assert steered != plain.completions[0].token_ids  # the steering changed the text


def test_one_placement_one_charge_and_a_usage_line_per_step(runtime):
    project = runtime.project_for(runtime.owner, None)
    result = runtime.session(steering_session()).result()
    assert [step.name for step in result.steps] == ["read", "steer"]
    read, steer = result.steps
    assert read.usage.completion_tokens == 0 and steer.usage.completion_tokens == 8
    assert result.usage.prompt_tokens == read.usage.prompt_tokens + steer.usage.prompt_tokens
    assert result.usage.completion_tokens == 8
    charges = [c for c in runtime.statement(project) if c["request_id"] == result.request_id]
    assert len(charges) == 1 and charges[0]["kind"] == "session"
    assert charges[0]["charged_su"] == pytest.approx(result.charge.charged_su) and result.charge.charged_su > 0
    # A charge line per step, adding up to the session's one charge exactly (micro-SUs).
    assert all(step.charged_su > 0 for step in result.steps)
    assert sum(round(step.charged_su * 1e6) for step in result.steps) == round(result.charge.charged_su * 1e6)


def test_a_session_through_the_service_gives_the_same_answer(http_client, runtime):
    over_http = http_client.session(steering_session()).result()
    in_process = runtime.session(steering_session()).result()
    assert over_http.step("steer").completions == in_process.step("steer").completions
    assert (over_http.saved("read", "h", 1) == in_process.saved("read", "h", 1)).all()


def test_a_value_from_another_step_patches_like_a_hand_written_patch(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.session([
        SessionStep(name="source", prompts=[POSITIVE], steps=[Save(point="model.layers.0", name="x")]),
        SessionStep(name="target", prompts=[NEGATIVE], steps=[
            Set(point="model.layers.0", value_from=FromSaved(terms=[SavedTerm(step="source", save="x")])),
            Save(point="lm_head")]),
    ]).result()
    ids = {p: torch.tensor([tokenizer(p)["input_ids"]]) for p in (POSITIVE, NEGATIVE)}
    kept = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: kept.setdefault("x", out.clone()))
    with torch.no_grad():
        model(input_ids=ids[POSITIVE])
    handle.remove()
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: kept["x"])
    with torch.no_grad():
        patched = model(input_ids=ids[NEGATIVE]).logits[0]
    handle.remove()
    assert torch.equal(torch.from_numpy(result.saved("target", "lm_head.output")), patched)


@pytest.mark.parametrize("steps, message", [
    ([SessionStep(name="a", prompts=[PROMPT], steps=[Add(point=LAYER, value_from=FromSaved(
        terms=[SavedTerm(step="later", save="h")]))])], "not an earlier step"),
    ([SessionStep(name="a", prompts=[PROMPT], steps=[Save(point=LAYER, name="h")]),
      SessionStep(name="b", prompts=[PROMPT], steps=[Add(point=LAYER, value_from=FromSaved(
          terms=[SavedTerm(step="a", save="other")]))])], "saves no 'other'"),
    ([SessionStep(name="a", prompts=[PROMPT], steps=[Save(point=LAYER, name="h")]),
      SessionStep(name="b", prompts=[PROMPT], steps=[Add(point=LAYER, value_from=FromSaved(
          terms=[SavedTerm(step="a", save="h", prompt=3)]))])], "keeps nothing for prompt 3"),
    ([SessionStep(name="a", prompts=[PROMPT]), SessionStep(name="a", prompts=[PROMPT])], "two steps are named"),
    ([SessionStep(name=f"s{i}", prompts=[PROMPT]) for i in range(MAX_SESSION_STEPS + 1)], "at most 16"),
])
def test_bad_sessions_are_refused_where_they_are_built(steps, message):
    with pytest.raises(InvalidRequest, match=message):
        SessionRequest.create("demo-llama", steps=steps)


def test_value_from_outside_a_session_is_refused(runtime):
    with pytest.raises(InvalidRequest, match="send this trace as a step of a session"):
        runtime.trace(PROMPT, steps=[Add(point=LAYER, value_from=FromSaved(
            terms=[SavedTerm(step="a", save="h")]))]).result()


def test_a_value_of_the_wrong_shape_refuses_the_session_before_any_step_runs(runtime):
    project = runtime.project_for(runtime.owner, None)
    before = runtime.ledger.balances(project)
    # Known before sending: an MLP-wide value into the residual stream.
    with pytest.raises(InvalidRequest, match="session step 'b'.*expected \\[128\\]"):
        runtime.session([
            SessionStep(name="a", prompts=[PROMPT], steps=[Save(point="model.layers.0.mlp.act_fn", name="m",
                                                                 reduce=Reduce(op="mean"))]),
            SessionStep(name="b", prompts=[PROMPT], steps=[Add(point=LAYER, value_from=FromSaved(
                terms=[SavedTerm(step="a", save="m")]))]),
        ]).result()
    # Known only once tokenized (on the replica): every row of a 12-token prompt into an 8-token one.
    with pytest.raises(InvalidRequest, match="session step 'b'"):
        runtime.session([
            SessionStep(name="a", prompts=[PROMPT], steps=[Save(point=LAYER, name="h")]),
            SessionStep(name="b", prompts=[POSITIVE], steps=[Set(point=LAYER, value_from=FromSaved(
                terms=[SavedTerm(step="a", save="h")]))]),
        ]).result()
    # A reduction over an axis the point does not have, in a later step.
    with pytest.raises(InvalidRequest, match="no heads axis"):
        runtime.session([
            SessionStep(name="a", prompts=[PROMPT], steps=[Save(point=LAYER)]),
            SessionStep(name="b", prompts=[PROMPT], steps=[Save(point=LAYER, reduce=Reduce(op="mean", over="heads"))]),
        ]).result()
    assert runtime.ledger.balances(project) == before
    assert runtime.trace(PROMPT, steps=[Save(point=LAYER)]).result().replica.warm  # the replica is fine


def test_a_plain_tensor_value_still_works_in_a_session(runtime):
    value = TensorData.of(torch.ones(128))
    result = runtime.session([SessionStep(name="only", prompts=[PROMPT], steps=[
        Add(point=LAYER, value=value), Save(point=LAYER, name="after")])]).result()
    assert result.saved("only", "after").shape[1] == 128


def test_a_session_over_the_sites_limits_is_refused_before_any_step_runs(reference_model, tmp_path):
    from functions.interventions.session import run_session
    from functions.interventions.tracer import Tracer
    from functions.policy import WorkerPolicy
    from tpm_fed.protocol.errors import PayloadTooLarge

    model, tokenizer = reference_model
    tracer = Tracer(model, tokenizer, 256, {2}, 0)
    session = SessionRequest.create("demo-llama", steps=steering_session())
    ran = []
    handle = model.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        with pytest.raises(InvalidRequest, match="runs at most 1 in one session"):
            run_session(tracer, session, policy=WorkerPolicy(max_session_steps=1))
        with pytest.raises(PayloadTooLarge, match="returns at most 100"):
            run_session(tracer, session, policy=WorkerPolicy(max_result_bytes=100))
        assert ran == []  # refused before the first step's forward pass
        tensors, reply = run_session(tracer, session, policy=WorkerPolicy())
    finally:
        handle.remove()
    assert ran and [step["name"] for step in reply["steps"]] == ["read", "steer"]
    assert set(tensors) == {"read/0:h", "read/1:h"}


def test_a_value_with_a_row_per_position_cannot_edit_generated_tokens(runtime):
    per_row = Add(point=LAYER, positions=[0, 1], generated=True, value=TensorData.of(torch.ones(2, 128)))
    with pytest.raises(InvalidRequest, match="cannot also edit generated tokens"):
        runtime.trace(PROMPT, max_new_tokens=2, steps=[per_row]).result()
    from_step = Set(point=LAYER, positions=[0, 1], generated=True, value_from=FromSaved(
        terms=[SavedTerm(step="a", save="h")]))
    with pytest.raises(InvalidRequest, match="cannot also edit generated tokens"):
        runtime.session([SessionStep(name="a", prompts=[PROMPT], steps=[Save(point=LAYER, name="h", positions=[2, 3])]),
                         SessionStep(name="b", prompts=[PROMPT], max_new_tokens=2, steps=[from_step])]).result()
