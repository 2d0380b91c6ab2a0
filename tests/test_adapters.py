"""Mode 2: registered adapters around the shared core, against the same composition by hand."""

from __future__ import annotations

from concurrent.futures import wait

import numpy as np
import pytest
import torch

from functions.adapters.build import build_module
from tpm_fed.adapters import Activation, Architecture, Conv1d, LayerNorm, Linear, Unflatten
from tpm_fed.protocol.errors import AdapterMismatch, InvalidRequest, PlacementRefused, UnknownAdapter

HIDDEN = 128


def registered(runtime, name, architecture, seed):
    torch.manual_seed(seed)
    module = build_module(architecture)
    return runtime.adapters.register(name, architecture, module.state_dict()), module


@pytest.fixture(scope="module")
def adapters(runtime):
    spectrum = Architecture(layers=[Linear(in_features=6, out_features=64), Activation(function="gelu"),
                                    Linear(in_features=64, out_features=HIDDEN)])
    fingerprint = Architecture(layers=[LayerNorm(features=16), Linear(in_features=16, out_features=4 * HIDDEN),
                                       Unflatten(tokens=4)])
    signal = Architecture(layers=[Conv1d(in_channels=3, out_channels=HIDDEN, kernel_size=3)])
    head = Architecture(layers=[Linear(in_features=HIDDEN, out_features=2)])
    return {
        "spectrum": registered(runtime, "spectrum-in", spectrum, 0),
        "fingerprint": registered(runtime, "fingerprint-in", fingerprint, 1),
        "signal": registered(runtime, "signal-in", signal, 2),
        "head": registered(runtime, "bandgap-head", head, 3),
    }


def by_hand(model, module, head, x, pool):
    with torch.no_grad():
        embeddings = module(torch.as_tensor(x))
        embeddings = embeddings.reshape(-1, HIDDEN)
        states = model.model(inputs_embeds=embeddings[None]).last_hidden_state[0]
        state = states[-1] if pool == "last" else states.mean(0) if pool == "mean" else states
        return head(state) if head is not None else state


def test_input_module_and_head_around_the_core_equal_the_composition_by_hand(runtime, reference_model, adapters):
    model, _ = reference_model
    x = np.random.default_rng(0).random((5, 6), dtype=np.float32)
    result = runtime.embed([x], input_module="spectrum-in", head="bandgap-head", pool="last").result()
    expected = by_hand(model, adapters["spectrum"][1], adapters["head"][1], x, "last")
    torch.testing.assert_close(torch.from_numpy(result.outputs[0]), expected)
    assert result.usage.prompt_tokens == 5 and result.charge.charged_su > 0
    hidden = runtime.embed([x], input_module=adapters["spectrum"][0].ref).result()  # no head: final hidden states
    torch.testing.assert_close(torch.from_numpy(hidden.outputs[0]),
                               by_hand(model, adapters["spectrum"][1], None, x, "none"))


def test_mixed_adapter_batch_equals_each_request_run_alone(runtime, reference_model, adapters):
    model, _ = reference_model
    rng = np.random.default_rng(1)
    cases = []
    for index in range(16):
        kind = ("spectrum", "fingerprint", "signal")[index % 3]
        x = {"spectrum": rng.random((3 + index % 4, 6), dtype=np.float32),
             "fingerprint": rng.random(16, dtype=np.float32),
             "signal": rng.random((4 + index % 3, 3), dtype=np.float32)}[kind]
        cases.append((kind, x))
    futures = [runtime.embed([x], input_module=adapters[kind][0].ref, head="bandgap-head", pool="mean")
               for kind, x in cases]
    wait(futures)
    results = [f.result() for f in futures]
    assert max(r.replica.batch_size for r in results) > 1  # they shared core batches
    for (kind, x), result in zip(cases, results, strict=True):
        expected = by_hand(model, adapters[kind][1], adapters["head"][1], x, "mean")
        torch.testing.assert_close(torch.from_numpy(result.outputs[0]), expected, rtol=1e-5, atol=1e-6)


def test_adapter_versions_are_content_addressed(runtime, adapters):
    record, module = adapters["head"]
    again = runtime.adapters.register("bandgap-head", record.architecture, module.state_dict())
    assert again.version == record.version
    changed = {k: v + 1 for k, v in module.state_dict().items()}
    newer = runtime.adapters.register("bandgap-head", record.architecture, changed)
    assert newer.version != record.version
    assert runtime.adapters.resolve("bandgap-head").version == newer.version  # newest by default
    assert runtime.adapters.resolve(f"bandgap-head@{record.version[:6]}").version == record.version


def test_bad_adapters_and_inputs_are_refused_at_no_cost(runtime, adapters, tmp_path):
    project = runtime.project_for(runtime.owner, None)
    before = runtime.ledger.balances(project)
    x = np.ones((2, 6), np.float32)
    with pytest.raises(UnknownAdapter, match="known: .*spectrum-in"):
        runtime.embed([x], input_module="spectrum-inn")
    with pytest.raises(UnknownAdapter, match="no version 'ffff'"):
        runtime.embed([x], input_module="spectrum-in@ffff")
    with pytest.raises(InvalidRequest, match="input 0 has 7 features; input module .* takes 6"):
        runtime.embed([np.ones((2, 7), np.float32)], input_module="spectrum-in")
    narrow = Architecture(layers=[Linear(in_features=6, out_features=64)])
    runtime.adapters.register("narrow-in", narrow, build_module(narrow).state_dict())
    with pytest.raises(AdapterMismatch, match="64-wide embeddings; the core's hidden size is 128"):
        runtime.embed([x], input_module="narrow-in")
    with pytest.raises(AdapterMismatch, match="takes 6 features; the core's hidden size is 128"):
        runtime.embed([x], input_module="spectrum-in", head="spectrum-in")
    with pytest.raises(PlacementRefused, match="runs only on a site project"):
        runtime.embed([x], input_code="not really code")
    with pytest.raises(InvalidRequest, match="not floating point"):
        runtime.embed([np.ones((2, 6), np.int32)], input_module="spectrum-in")
    assert runtime.ledger.balances(project) == before


def test_weights_that_do_not_fit_the_architecture_or_are_pickled_are_refused(runtime, tmp_path):
    architecture = Architecture(layers=[Linear(in_features=6, out_features=HIDDEN)])
    with pytest.raises(AdapterMismatch, match=r"missing 0.bias \[128\]; 0.weight is \[128, 5\], expected \[128, 6\]"):
        runtime.adapters.register("bad", architecture, {"0.weight": torch.zeros(HIDDEN, 5)})
    pickled = tmp_path / "weights.pt"
    torch.save(build_module(architecture).state_dict(), pickled)
    with pytest.raises(AdapterMismatch, match="not a safetensors file"):
        runtime.adapters.register("bad", architecture, pickled)
    with pytest.raises(AdapterMismatch, match="takes 64 features but the layer before gives 32"):
        Architecture(layers=[Linear(in_features=6, out_features=32), Linear(in_features=64, out_features=8)]).out_features
    assert runtime.adapters.versions("bad") == []


def test_expected_tensors_are_what_the_built_module_holds():
    """The contract lists each layer's tensors without torch; the worker's modules must hold exactly those."""
    for architecture in (
        Architecture(layers=[Linear(in_features=6, out_features=8), Activation(function="silu"),
                             Linear(in_features=8, out_features=4, bias=False)]),
        Architecture(layers=[LayerNorm(features=16), Linear(in_features=16, out_features=8), Unflatten(tokens=2)]),
        Architecture(layers=[Conv1d(in_channels=3, out_channels=8, kernel_size=3), Activation(function="tanh")]),
    ):
        built = {name: tuple(tensor.shape) for name, tensor in build_module(architecture).state_dict().items()}
        assert architecture.expected_tensors() == built


def test_the_adapter_cache_keeps_one_module_per_dtype(tmp_path):
    from functions.adapters.loader import AdapterCache
    from tpm_fed.storage.adapter_registry import AdapterRegistry

    architecture = Architecture(layers=[Linear(in_features=6, out_features=HIDDEN)])
    record = AdapterRegistry(tmp_path).register("spectrum-in", architecture, build_module(architecture).state_dict())
    cache = AdapterCache()
    full, _ = cache.get(tmp_path, record.ref, torch.float32)
    half, _ = cache.get(tmp_path, record.ref, torch.bfloat16)
    assert next(full.parameters()).dtype == torch.float32  # not cast in place by the second request
    assert next(half.parameters()).dtype == torch.bfloat16
    assert cache.get(str(tmp_path), record.ref, torch.float32)[0] is full  # cached, whatever the path type
