"""Generation through the embedded federation, checked against transformers directly."""

from __future__ import annotations

from concurrent.futures import wait

import pytest
import torch

from tests.test_version import perturb_one_weight
from tpm_fed.protocol.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadError,
    NotPermitted,
    UnknownModel,
    UnknownVersion,
)
from tpm_fed.protocol.requests import GenerationRequest

PROMPTS = [
    "The cell",
    "The climate model runs on many nodes",
    "A scientist can reproduce a result when",
    "The",
]


def direct_greedy(reference_model, prompts, max_new_tokens):
    """``model.generate`` on the same batch, cut at EOS: the oracle."""
    model, tokenizer = reference_model
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    rows = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("prompt", PROMPTS)
def test_single_prompt_matches_transformers_token_for_token(runtime, reference_model, prompt):
    result = runtime.generate(prompt, max_new_tokens=24).result(timeout=120)
    assert result.token_ids == direct_greedy(reference_model, [prompt], 24)
    assert result.texts[0] == reference_model[1].decode(result.token_ids[0], skip_special_tokens=True)


def test_batch_of_different_lengths_matches_transformers(runtime, reference_model):
    result = runtime.generate(PROMPTS, max_new_tokens=20).result(timeout=120)
    assert result.token_ids == direct_greedy(reference_model, PROMPTS, 20)
    assert result.usage.completion_tokens == sum(len(ids) for ids in result.token_ids)
    tokenizer = reference_model[1]
    assert result.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)


def test_result_names_model_version_backend_and_site(runtime):
    result = runtime.generate("The cell", max_new_tokens=4).result(timeout=120)
    resolved = runtime.catalog.resolve(result_ref := runtime.default_model())
    assert result.model == result_ref.name == "demo-llama"
    assert result.version == resolved.spec.version and len(result.version) == 16
    assert (result.backend, result.site) == ("torch", "local")
    assert result.replica.replica_id.endswith(f"demo-llama@{result.version}:torch")


def test_second_request_reuses_the_warm_replica(runtime):
    from functions.serve import worker_info

    first = runtime.generate("The river", max_new_tokens=4).result(timeout=120)
    second = runtime.generate("The glacier", max_new_tokens=4).result(timeout=120)
    assert second.replica.warm
    assert second.timings.load_s == 0.0
    assert second.replica.pid == first.replica.pid
    assert second.replica.replica_id == first.replica.replica_id
    held = runtime.site("local").submit(worker_info).result(timeout=60)
    assert held["pid"] == second.replica.pid
    assert [(m["name"], m["version"]) for m in held["loaded"]] == [("demo-llama", second.version)]


def test_concurrent_requests_are_batched_and_each_answered_correctly(runtime, reference_model):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    futures = [runtime.generate(p, max_new_tokens=12) for p in prompts]
    wait(futures, timeout=120)
    results = [f.result() for f in futures]
    assert max(r.replica.batch_size for r in results) > 1  # they did share a batch
    expected = {p: direct_greedy(reference_model, [p], 12)[0] for p in set(prompts)}
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == expected[prompt]
    assert len({r.request_id for r in results}) == 16


def test_per_request_limits_and_stops_inside_one_batch(runtime, reference_model):
    short = runtime.generate("The climate model runs on many nodes", max_new_tokens=3)
    stopped = runtime.generate("The climate model runs on many nodes", max_new_tokens=30, stop=["cluster"])
    full = direct_greedy(reference_model, ["The climate model runs on many nodes"], 30)[0]
    assert short.result(timeout=120).token_ids[0] == full[:3]
    assert short.result().completions[0].finish_reason == "length"
    done = stopped.result(timeout=120).completions[0]
    assert done.finish_reason == "stop" and "cluster" not in done.text
    assert reference_model[1].decode(full).startswith(done.text)


def test_seeded_sampling_is_reproducible(runtime):
    params = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=1234)
    first = runtime.generate("The", **params).result(timeout=120)
    again = runtime.generate("The", **params).result(timeout=120)
    other = [runtime.generate("The", **{**params, "seed": s}).result(timeout=120) for s in (1, 2, 3)]
    assert first.token_ids == again.token_ids
    assert any(o.token_ids != first.token_ids for o in other)


def test_version_follows_the_weights(runtime, home):
    mutable = home.models_dir / "mutable"
    before = runtime.generate("The cell", model="mutable", max_new_tokens=4).result(timeout=120)
    weights = mutable / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime
    same = runtime.generate("The cell", model="mutable", max_new_tokens=4).result(timeout=120)
    assert same.version == before.version and same.replica.warm
    perturb_one_weight(mutable)
    after = runtime.generate("The cell", model="mutable", max_new_tokens=4).result(timeout=120)
    assert after.version != before.version and not after.replica.warm
    with pytest.raises(UnknownVersion, match=after.version):
        runtime.generate("The cell", model=f"mutable@{before.version}", max_new_tokens=4)
    pinned = runtime.generate("The cell", model=f"mutable@{after.version[:8]}", max_new_tokens=4)
    assert pinned.result(timeout=120).version == after.version


def test_edge_refusals_raise_before_anything_runs(runtime):
    before = runtime.log.queued()
    with pytest.raises(UnknownModel, match="demo-llama"):
        runtime.generate("x", model="no-such-model")
    with pytest.raises(UnknownVersion, match="available"):
        runtime.generate("x", model="demo-llama@ffffffff")
    with pytest.raises(InvalidRequest, match="prompts"):
        runtime.generate([])
    with pytest.raises(InvalidRequest, match="prompt 0 is empty"):
        runtime.generate("")
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        runtime.generate("x", max_new_tokens=0)
    with pytest.raises(ContextLengthExceeded, match="context of 256"):
        runtime.generate("x", max_new_tokens=256)
    with pytest.raises(InvalidRequest, match="temperature"):
        runtime.generate("x", temperature=-1)
    with pytest.raises(ModelLoadError, match="no config.json"):
        runtime.generate("x", model="missing")
    assert runtime.log.queued() == before


def test_prompt_longer_than_the_context_is_refused_by_the_replica(runtime):
    too_long = "The cell divides when its copy of the genome is complete. " * 30
    request = GenerationRequest.create([too_long], "demo-llama", max_new_tokens=8)
    bad = runtime.submit(request)
    good = runtime.generate("The cell", max_new_tokens=8)  # may share bad's batch
    with pytest.raises(ContextLengthExceeded, match="exceeds the model's context of 256"):
        bad.result(timeout=120)
    assert good.result(timeout=120).completions[0].text
    assert runtime.log.status_of(request.request_id) == "failed"


@pytest.mark.parametrize(("model", "message"), [("truncated", "could not load"), ("no-weights", "could not load")])
def test_corrupt_model_fails_clearly_and_the_worker_keeps_serving(runtime, model, message):
    pending = runtime.generate("The cell", model=model, max_new_tokens=4)
    with pytest.raises(ModelLoadError, match=message):
        pending.result(timeout=120)
    assert runtime.generate("The cell", max_new_tokens=4).result(timeout=120).completions[0].text


def test_request_log_ledger_and_replicas_record_outcomes(runtime):
    ok = runtime.generate("The cell", max_new_tokens=4).result(timeout=120)
    replica = runtime.broker.registry.get(f"local/demo-llama@{ok.version}/torch/0")
    assert replica.state == "warm" and replica.queue_depth == 0
    bad = GenerationRequest.create("The cell", "truncated", max_new_tokens=4)
    with pytest.raises(ModelLoadError):
        runtime.submit(bad).result(timeout=120)
    assert replica.state == "stopped"  # the idle replica gave its slot to the new model
    assert runtime.log.status_of(ok.request_id) == "done"
    assert runtime.log.status_of(bad.request_id) == "failed"
    charges = {c.request_id: c for c in runtime.ledger.statement()}
    assert charges[ok.request_id].state == "settled" and charges[ok.request_id].charged_usu > 0
    assert charges[bad.request_id].state == "released" and charges[bad.request_id].charged_usu == 0


def test_min_new_tokens_suppresses_eos_like_transformers(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.generate("The cell", max_new_tokens=24, min_new_tokens=24).result(timeout=120)
    batch = tokenizer(["The cell"], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            **batch, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert result.token_ids[0] == output[0, batch["input_ids"].shape[1] :].tolist()
    assert len(result.token_ids[0]) == 24 and result.completions[0].finish_reason == "length"


def test_results_carry_their_charge_and_the_ledger_agrees(runtime):
    result = runtime.generate(["The cell", "The river"], max_new_tokens=8).result(timeout=120)
    charge = result.charge
    assert charge.project == "tests" and not charge.free
    assert 0 < charge.charged_su <= charge.estimate_su
    price = runtime.federation.prices.generate
    expected = (result.usage.prompt_tokens * price.per_1k_prompt_tokens
                + result.usage.completion_tokens * price.per_1k_completion_tokens) / 1000
    if not result.replica.warm:
        expected += price.per_cold_start
    assert charge.charged_su == pytest.approx(expected, abs=2e-6)
    line = next(c for c in runtime.ledger.statement() if c.request_id == result.request_id)
    assert line.charged_usu == round(charge.charged_su * 1_000_000)
    assert "placed on local" in result.placement


def test_refusals_by_the_broker_charge_nothing(runtime):
    before = runtime.ledger.balances("tests")
    with pytest.raises(NotPermitted, match="not a member of project 'someone-else'"):
        runtime.generate("x", project="someone-else")
    with pytest.raises(InvalidRequest, match="unknown location 'mars'"):
        runtime.generate("x", location="mars")
    assert runtime.ledger.balances("tests") == before


def test_a_request_over_the_payload_limit_is_refused_before_anything_runs(runtime):
    from tpm_fed.protocol.errors import PayloadTooLarge

    before = runtime.ledger.balances("tests")
    with pytest.raises(PayloadTooLarge, match="a Globus Compute task holds at most"):
        runtime.generate(["The cell " * 1_200_000, "x"], max_new_tokens=1)  # ~10.8 MB
    assert runtime.ledger.balances("tests") == before


def test_a_result_over_the_payload_limit_comes_back_as_a_typed_error(runtime):
    from tests.helpers import big_result
    from tpm_fed.protocol.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge, match="over the 10 MB"):
        runtime.site("local").submit(big_result, 11 * 1024 * 1024).result(timeout=120)
