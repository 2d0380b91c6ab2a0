"""Mode 3 through the whole path (runtime, broker, ledger, engine, replica) against torch by hand.

Each oracle runs the same computation with plain torch forward hooks on the
reference model. A single prompt runs unpadded on both sides, so float32
results must be equal, not close.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from tpm_fed.protocol.errors import InvalidRequest, PayloadTooLarge, PlacementRefused, UnknownPoint
from tpm_fed.interventions import (
    Ablate, Add, AttentionLens, AttentionPatterns, Inject, LogitLens, Patch, PythonHook, Reduce, Save, Scale,
    Set, TraceRequest,
)
from tpm_fed.protocol.tensors import TensorData

PROMPT = "The telescope observed the"
LAYERS = 4


def hand_run(model, tokenizer, prompts, hooks=(), pre_hooks=()):
    """Logits of an unpadded batch (equal token counts) with hand-written hooks in place."""
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    handles = [model.get_submodule(n).register_forward_hook(f) for n, f in hooks]
    handles += [model.get_submodule(n).register_forward_pre_hook(f) for n, f in pre_hooks]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def capture(store, key):
    def hook(module, args, output):
        store[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
    return hook


def test_saved_activations_equal_torch_hooks(runtime, reference_model):
    model, tokenizer = reference_model
    points = ["model.embed_tokens", "model.layers.0", "model.layers.2.mlp", "model.layers.1.self_attn",
              "model.norm", "lm_head"]
    result = runtime.trace(PROMPT, steps=[Save(point=p) for p in points]
                          + [Save(point="model.layers.3.mlp.input"),
                             Save(point="model.layers.2.self_attn.heads[2]", positions=[0, -1])]).result()

    captured, inputs = {}, {}
    hooks = [(p, capture(captured, p)) for p in points]
    pre = [("model.layers.3.mlp", lambda m, a: inputs.__setitem__("mlp3", a[0].clone())),
           ("model.layers.2.self_attn.o_proj", lambda m, a: inputs.__setitem__("o2", a[0].clone()))]
    hand_run(model, tokenizer, [PROMPT], hooks, pre)

    for point in points:
        assert torch.equal(torch.from_numpy(result.saved(f"{point}.output")), captured[point][0]), point
    assert torch.equal(torch.from_numpy(result.saved("model.layers.3.mlp.input")), inputs["mlp3"][0])
    head = inputs["o2"][0].view(-1, 4, 32)[[0, -1], 2]
    assert torch.equal(torch.from_numpy(result.saved("model.layers.2.self_attn.heads[2]")), head)
    assert result.usage.activation_bytes == len(result.tensors_blob) > 0
    assert result.charge is not None and result.charge.charged_su > 0
    assert result.prompt_tokens[0] == tokenizer.convert_ids_to_tokens(tokenizer(PROMPT)["input_ids"])


def test_logit_lens_equals_norm_and_unembedding_by_hand(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.trace(PROMPT, logit_lens=LogitLens(top_k=5)).result()
    captured = {}
    logits = hand_run(model, tokenizer, [PROMPT], [(f"model.layers.{i}", capture(captured, i)) for i in range(LAYERS)])
    lens = result.logit_lens()
    ids, probs = np.array(lens.ids), np.array(lens.probs)
    assert ids.shape == (LAYERS, len(result.prompt_tokens[0]), 5)
    # Last layer: the model's own logits.
    top = torch.softmax(logits[0], dim=-1).topk(5)
    assert np.array_equal(ids[-1], top.indices.numpy())
    torch.testing.assert_close(torch.from_numpy(probs[-1]), top.values)
    with torch.no_grad():
        for layer in range(LAYERS):
            by_hand = torch.softmax(model.lm_head(model.model.norm(captured[layer][0])), dim=-1).topk(5)
            assert np.array_equal(ids[layer], by_hand.indices.numpy()), layer
            torch.testing.assert_close(torch.from_numpy(probs[layer]), by_hand.values)
    assert lens.tokens[-1][-1][0] == tokenizer.convert_ids_to_tokens(int(ids[-1, -1, 0]))


def test_patch_changes_the_output_as_a_hand_written_patch(runtime, reference_model):
    model, tokenizer = reference_model
    clean, corrupt = "The cell divides and the", "The star divides and the"
    assert len(tokenizer(clean)["input_ids"]) == len(tokenizer(corrupt)["input_ids"])
    result = runtime.trace([clean, corrupt], steps=[Patch(point="model.layers.1", source=0, positions=[1, 2]),
                                                   Save(point="lm_head", prompts=[1])]).result()

    def patch(module, args, output):
        output = output.clone()
        output[1, [1, 2]] = output[0, [1, 2]]
        return output

    logits = hand_run(model, tokenizer, [clean, corrupt], [("model.layers.1", patch)])
    unpatched = hand_run(model, tokenizer, [clean, corrupt])
    patched = torch.from_numpy(result.saved("lm_head.output", prompt=1))
    assert torch.equal(patched, logits[1])
    assert not torch.equal(patched, unpatched[1])  # the patch did something


def test_zero_ablating_all_heads_equals_zeroing_the_output_projection_input(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.trace(PROMPT, steps=[Ablate(point="model.layers.1.self_attn.heads[*]"),
                                         Save(point="lm_head")]).result()
    logits = hand_run(model, tokenizer, [PROMPT],
                      pre_hooks=[("model.layers.1.self_attn.o_proj", lambda m, a: (torch.zeros_like(a[0]),))])
    assert torch.equal(torch.from_numpy(result.saved("lm_head.output")), logits[0])


def test_set_add_scale_and_memory_injection_equal_hand_edits(runtime, reference_model):
    model, tokenizer = reference_model
    steer = torch.randn(128, generator=torch.Generator().manual_seed(1))
    replacement = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    memory_ids = tokenizer(" stars", add_special_tokens=False)["input_ids"]
    steps = [
        Add(point="model.layers.0", positions=[-1], value=TensorData.of(steer)),
        Set(point="model.layers.1.mlp", positions=[0, 1], value=TensorData.of(replacement)),
        Scale(point="model.layers.2.self_attn.heads[3]", factor=0.5),
        Inject(point="model.layers.2.self_attn", positions=[-1], text=" stars", scale=4.0),
        Save(point="lm_head"),
    ]
    result = runtime.trace(PROMPT, steps=steps).result()

    def add(module, args, out):
        out = out.clone(); out[0, -1] += steer; return out  # noqa: E702

    def set_(module, args, out):
        out = out.clone(); out[0, [0, 1]] = replacement; return out  # noqa: E702

    def scale(module, args):
        z = args[0].clone(); z.view(*z.shape[:2], 4, 32)[:, :, 3] *= 0.5; return (z,)  # noqa: E702

    def inject(module, args, out):
        hidden = out[0].clone()
        with torch.no_grad():
            hidden[0, -1] += model.model.embed_tokens(torch.tensor(memory_ids)).sum(0) * 4.0
        return (hidden, *out[1:])

    logits = hand_run(model, tokenizer, [PROMPT],
                      [("model.layers.0", add), ("model.layers.1.mlp", set_), ("model.layers.2.self_attn", inject)],
                      [("model.layers.2.self_attn.o_proj", scale)])
    assert torch.equal(torch.from_numpy(result.saved("lm_head.output")), logits[0])


def test_generation_applies_edits_at_every_generated_step(runtime, reference_model):
    model, tokenizer = reference_model
    steer = torch.randn(128, generator=torch.Generator().manual_seed(3)) * 2
    result = runtime.trace(PROMPT, max_new_tokens=8,
                          steps=[Add(point="model.layers.1", value=TensorData.of(steer), generated=True)]).result()

    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: out + steer)
    try:
        ids = tokenizer(PROMPT, return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.input_ids.shape[1]:]
    finally:
        handle.remove()
    plain = runtime.generate(PROMPT, max_new_tokens=8).result()
    assert result.completions[0].token_ids == [t for t in expected.tolist() if t != tokenizer.eos_token_id][:8]
    assert result.completions[0].token_ids != plain.completions[0].token_ids  # the steering changed the text


def test_attention_patterns_and_attention_lens(runtime, reference_model):
    model, tokenizer = reference_model
    result = runtime.trace(PROMPT, attention_patterns=AttentionPatterns(layers=[0, 3]),
                          attention_lens=AttentionLens(layers=[2], heads=[1, 3], top_k=4)).result()
    ids = tokenizer(PROMPT, return_tensors="pt")
    z = {}
    handle = model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, a: z.__setitem__("z", a[0]))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
        handle.remove()
    patterns = torch.from_numpy(result.attention_patterns())
    assert torch.equal(patterns[0], out.attentions[0][0]) and torch.equal(patterns[1], out.attentions[3][0])
    lens = np.array(result.attention_lens().ids)  # [layers, heads, positions, k]
    weight = model.model.layers[2].self_attn.o_proj.weight
    with torch.no_grad():
        for column, head in enumerate([1, 3]):
            contribution = z["z"][0, -1].view(4, 32)[head] @ weight[:, head * 32:(head + 1) * 32].T
            top = torch.softmax(model.lm_head(model.model.norm(contribution)), -1).topk(4)
            assert np.array_equal(lens[0, column, 0], top.indices.numpy())


def test_spec_is_plain_json_both_ways():
    request = TraceRequest.create(
        "demo-llama", prompts=["a b"],
        steps=[Add(point="model.layers.1", positions=[-1], value=TensorData.of(np.ones(128, np.float32))),
               Patch(point="model.layers.2.self_attn.heads[1]", source=0, prompts=[0])],
        logit_lens=LogitLens(layers=[0, -1]))
    text = json.dumps(request.to_wire())
    assert TraceRequest.from_wire(json.loads(text)) == request


@pytest.mark.parametrize(("steps", "error", "message"), [
    ([Save(point="model.layers.9")], UnknownPoint, "closest: model.layers.3.output"),
    ([Save(point="model.layer.1.mlp")], UnknownPoint, "model.layers.1.mlp.output"),
    ([Ablate(point="model.layers.1.self_attn.heads[4]")], UnknownPoint, "heads 0..3"),
    ([Add(point="model.layers.1", value=TensorData.of(np.ones(64, np.float32)))], InvalidRequest, r"expected \[128\]"),
    ([Inject(point="model.layers.1.mlp.gate_proj", text="x")], InvalidRequest, "hidden size"),
    ([Save(point="model.layers.1", reduce=Reduce(op="mean", over="heads"))], InvalidRequest, "no heads axis"),
    ([Save(point="model.layers.1", reduce=Reduce(op="project", vectors=TensorData.of(np.ones((2, 64), np.float32))))],
     InvalidRequest, "vectors have 64 features; the point has 128"),
])
def test_bad_specs_are_refused_at_the_edge_listing_valid_names(runtime, steps, error, message):
    before = runtime.ledger.balances(runtime.project_for(runtime.owner, None))
    with pytest.raises(error, match=message):
        runtime.trace(PROMPT, steps=steps)
    assert runtime.ledger.balances(runtime.project_for(runtime.owner, None)) == before


@pytest.mark.parametrize("request_fields", [
    {"steps": [Add(point="model.layers.1", value=TensorData.of(np.ones(64, np.float32)))]},
    {"steps": [Set(point="model.layers.1", positions=[0, 1], value=TensorData.of(np.ones((3, 128), np.float32)))]},
    {"steps": [Inject(point="model.layers.1.mlp.gate_proj", text="x")]},
    {"steps": [Ablate(point="model.layers.1.self_attn.heads[4]")]},
    {"attention_lens": AttentionLens(heads=[7])},
    {"logit_lens": LogitLens(layers=[9])},
    {"steps": [Save(point="model.layers.1", reduce=Reduce(op="max", over="heads"))]},
], ids=["add-shape", "set-rows", "inject-width", "head", "lens-head", "lens-layer", "reduce-axis"])
def test_the_worker_refuses_a_bad_spec_with_the_clients_own_words(runtime, reference_model, request_fields):
    """One check in the contract: the worker, handed a spec the runtime would refuse, refuses it alike."""
    from functions.interventions.tracer import Tracer
    from functions.policy import WorkerPolicy

    model, tokenizer = reference_model
    with pytest.raises(InvalidRequest) as at_client:
        runtime.trace(PROMPT, **request_fields)
    with pytest.raises(InvalidRequest) as at_worker:
        Tracer(model, tokenizer, 256, {2}, 0).run(TraceRequest.create("demo-llama", prompts=[PROMPT], **request_fields),
                                                  policy=WorkerPolicy())
    assert type(at_worker.value) is type(at_client.value) and str(at_worker.value) == str(at_client.value)


PROJECTION = TensorData.of(np.random.default_rng(7).standard_normal((3, 128)).astype(np.float32))


@pytest.mark.parametrize(("point", "reduce", "by_hand"), [
    ("model.layers.1", Reduce(op="mean"), lambda t: t.mean(dim=0)),
    ("model.layers.1", Reduce(op="max"), lambda t: t.amax(dim=0)),
    ("model.layers.2.mlp", Reduce(op="norm"), lambda t: torch.linalg.vector_norm(t, dim=-1)),
    ("model.layers.1.self_attn.heads[*]", Reduce(op="mean", over="heads"), lambda t: t.mean(dim=1)),
    ("model.layers.1.self_attn.heads[2]", Reduce(op="max", over="features"), lambda t: t.amax(dim=-1)),
    ("model.layers.1", Reduce(op="project", vectors=PROJECTION), lambda t: t @ PROJECTION.torch().T),
], ids=["mean-positions", "max-positions", "norm", "mean-heads", "max-features", "project"])
def test_a_worker_side_reduction_equals_the_reduction_by_hand(runtime, point, reduce, by_hand):
    """The replica reduces the tensor it saved; by hand, the same reduction of the whole tensor."""
    whole = runtime.trace(PROMPT, steps=[Save(point=point, name="whole")]).result()
    reduced = runtime.trace(PROMPT, steps=[Save(point=point, name="reduced", reduce=reduce)]).result()
    full = torch.from_numpy(whole.saved("whole"))
    expected = by_hand(full)
    assert reduced.saved("reduced").shape == tuple(expected.shape) == reduce.shape(tuple(full.shape))
    torch.testing.assert_close(torch.from_numpy(reduced.saved("reduced")), expected, rtol=1e-6, atol=1e-6)
    assert reduced.usage.activation_bytes < whole.usage.activation_bytes  # only the reduction moved, and was charged


def test_a_reduction_is_refused_when_its_parts_do_not_fit_together():
    for spec, message in [({"op": "project"}, "needs vectors"),
                          ({"op": "mean", "vectors": PROJECTION.model_dump()}, "only 'project' takes them"),
                          ({"op": "project", "over": "positions", "vectors": PROJECTION.model_dump()}, "contracts"),
                          ({"op": "mean", "over": "tokens"}, "over"),
                          ({"op": "median"}, "op")]:
        with pytest.raises(InvalidRequest, match=message):
            TraceRequest.create("demo-llama", prompts=["x"], steps=[{"op": "save", "point": "model.layers.1",
                                                                     "reduce": spec}])


def test_bad_tensors_and_indexes_are_refused():
    nan = np.full(128, np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        TensorData.of(nan)
    with pytest.raises(ValueError, match="not floating point"):
        TensorData.of(np.ones(128, np.int64))
    wire = {"op": "add", "point": "model.layers.1",
            "value": {"dtype": "float32", "shape": [128], "data": base64.b64encode(nan.tobytes()).decode()}}
    with pytest.raises(InvalidRequest, match="NaN"):
        TraceRequest.create("demo-llama", prompts=["x"], steps=[wire])
    with pytest.raises(InvalidRequest, match="prompt 2 is out of range"):
        TraceRequest.create("demo-llama", prompts=["x", "y"], steps=[Patch(point="model.layers.1", source=2)])
    with pytest.raises(InvalidRequest, match="not MODULE.PATH"):
        TraceRequest.create("demo-llama", prompts=["x"], steps=[{"op": "save", "point": "model..layers"}])


def test_position_out_of_range_costs_nothing_and_the_replica_survives(runtime):
    project = runtime.project_for(runtime.owner, None)
    before = runtime.ledger.balances(project)
    with pytest.raises(InvalidRequest, match=r"position 40 is out of range for a prompt of \d+ tokens"):
        runtime.trace(PROMPT, steps=[Save(point="model.layers.1", positions=[40])]).result()
    assert runtime.ledger.balances(project) == before
    assert runtime.trace(PROMPT, steps=[Save(point="model.layers.1", positions=[-1])]).result().replica.warm


def test_python_hooks_are_refused_on_shared_sites_before_anything_runs(runtime):
    project = runtime.project_for(runtime.owner, None)
    before = runtime.ledger.balances(project)
    hook = PythonHook.of("model.layers.1", lambda tensor: tensor * 2)
    with pytest.raises(PlacementRefused, match="runs only on a site project"):
        runtime.trace(PROMPT, python_hooks=[hook])
    assert runtime.ledger.balances(project) == before


def test_nnsight_gives_the_same_activations_and_logit_lens(runtime, demo_model_dir):
    pytest.importorskip("nnsight")
    from nnsight import LanguageModel

    reference = LanguageModel(str(demo_model_dir), dispatch=True)
    with reference.trace(PROMPT):
        layer1 = reference.model.layers[1].output.save()
        layer2 = reference.model.layers[2].output.save()
        lens2 = torch.softmax(reference.lm_head(reference.model.norm(layer2)), dim=-1).save()
    ours = runtime.trace(PROMPT, steps=[Save(point="model.layers.1")], logit_lens=LogitLens(top_k=3)).result()
    assert torch.equal(torch.from_numpy(ours.saved("model.layers.1.output")), layer1[0])
    top = lens2[0].topk(3)
    assert np.array_equal(np.array(ours.logit_lens().ids)[2], top.indices.numpy())
    torch.testing.assert_close(torch.from_numpy(ours.logit_lens().probs[2]), top.values)


@pytest.fixture(scope="module")
def own_site_client(tmp_path_factory, demo_model_dir):
    """A federation whose only site is the caller's project's own (byo) site."""
    import shutil
    from pathlib import Path

    from tpm_fed.service.runtime import Runtime
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(tmp_path_factory.mktemp("own-site"))
    shutil.copytree(demo_model_dir, home.models_dir / "demo-llama")
    Federation(
        name="own",
        sites=[SiteConfig(name="lab", billing="byo", owner="lab-group")],
        models=[ModelConfig(name="demo-llama", path=Path("models/demo-llama"), backend="torch",
                            kinds=["generate", "embed", "trace"])],
        projects=[ProjectConfig(name="lab-group", members=[LocalUser().current()])],
    ).dump(home.federation_file)
    with Runtime(home) as runtime:
        yield runtime


def test_python_hooks_and_adapter_code_run_on_the_callers_own_site(own_site_client, reference_model):
    model, tokenizer = reference_model
    hook = PythonHook.of("model.layers.1", lambda tensor: tensor * 2)
    result = own_site_client.trace(PROMPT, python_hooks=[hook], steps=[Save(point="lm_head")]).result()
    logits = hand_run(model, tokenizer, [PROMPT], [("model.layers.1", lambda m, a, out: out * 2)])
    assert torch.equal(torch.from_numpy(result.saved("lm_head.output")), logits[0])
    assert result.charge.free and result.site == "lab"

    from globus_compute_sdk.serialize import ComputeSerializer

    code = ComputeSerializer().serialize(lambda x: x.repeat(1, 32))  # 4 features -> 128
    x = np.random.default_rng(2).random((3, 4), dtype=np.float32)
    embedded = own_site_client.embed([x], input_code=code, pool="last").result()
    with torch.no_grad():
        expected = model.model(inputs_embeds=torch.from_numpy(x).repeat(1, 32)[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.from_numpy(embedded.outputs[0]), expected)
