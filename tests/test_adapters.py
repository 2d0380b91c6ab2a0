"""Mode 2: registered adapters around the shared core, against the same composition by hand."""

from __future__ import annotations

from concurrent.futures import wait

import numpy as np
import pytest
import torch

from tpm_fed.adapters import Activation, Architecture, Conv1d, LayerNorm, Linear, Unflatten
from tpm_fed.protocol.errors import AdapterMismatch, InvalidRequest, PlacementRefused, UnknownAdapter

HIDDEN = 128


def registered(client, name, architecture, seed):
    torch.manual_seed(seed)
    module = architecture.build()
    return client.adapters.register(name, architecture, module.state_dict()), module


@pytest.fixture(scope="module")
def adapters(client):
    spectrum = Architecture(layers=[Linear(in_features=6, out_features=64), Activation(function="gelu"),
                                    Linear(in_features=64, out_features=HIDDEN)])
    fingerprint = Architecture(layers=[LayerNorm(features=16), Linear(in_features=16, out_features=4 * HIDDEN),
                                       Unflatten(tokens=4)])
    signal = Architecture(layers=[Conv1d(in_channels=3, out_channels=HIDDEN, kernel_size=3)])
    head = Architecture(layers=[Linear(in_features=HIDDEN, out_features=2)])
    return {
        "spectrum": registered(client, "spectrum-in", spectrum, 0),
        "fingerprint": registered(client, "fingerprint-in", fingerprint, 1),
        "signal": registered(client, "signal-in", signal, 2),
        "head": registered(client, "bandgap-head", head, 3),
    }


def by_hand(model, module, head, x, pool):
    with torch.no_grad():
        embeddings = module(torch.as_tensor(x))
        embeddings = embeddings.reshape(-1, HIDDEN)
        states = model.model(inputs_embeds=embeddings[None]).last_hidden_state[0]
        state = states[-1] if pool == "last" else states.mean(0) if pool == "mean" else states
        return head(state) if head is not None else state


def test_input_module_and_head_around_the_core_equal_the_composition_by_hand(client, reference_model, adapters):
    model, _ = reference_model
    x = np.random.default_rng(0).random((5, 6), dtype=np.float32)
    result = client.embed([x], input_module="spectrum-in", head="bandgap-head", pool="last").result()
    expected = by_hand(model, adapters["spectrum"][1], adapters["head"][1], x, "last")
    torch.testing.assert_close(torch.from_numpy(result.outputs[0]), expected)
    assert result.usage.prompt_tokens == 5 and result.charge.charged_su > 0
    hidden = client.embed([x], input_module=adapters["spectrum"][0].ref).result()  # no head: final hidden states
    torch.testing.assert_close(torch.from_numpy(hidden.outputs[0]),
                               by_hand(model, adapters["spectrum"][1], None, x, "none"))


def test_mixed_adapter_batch_equals_each_request_run_alone(client, reference_model, adapters):
    model, _ = reference_model
    rng = np.random.default_rng(1)
    cases = []
    for index in range(16):
        kind = ("spectrum", "fingerprint", "signal")[index % 3]
        x = {"spectrum": rng.random((3 + index % 4, 6), dtype=np.float32),
             "fingerprint": rng.random(16, dtype=np.float32),
             "signal": rng.random((4 + index % 3, 3), dtype=np.float32)}[kind]
        cases.append((kind, x))
    futures = [client.embed([x], input_module=adapters[kind][0].ref, head="bandgap-head", pool="mean")
               for kind, x in cases]
    wait(futures)
    results = [f.result() for f in futures]
    assert max(r.replica.batch_size for r in results) > 1  # they shared core batches
    for (kind, x), result in zip(cases, results, strict=True):
        expected = by_hand(model, adapters[kind][1], adapters["head"][1], x, "mean")
        torch.testing.assert_close(torch.from_numpy(result.outputs[0]), expected, rtol=1e-5, atol=1e-6)


def test_adapter_versions_are_content_addressed(client, adapters):
    record, module = adapters["head"]
    again = client.adapters.register("bandgap-head", record.architecture, module.state_dict())
    assert again.version == record.version
    changed = {k: v + 1 for k, v in module.state_dict().items()}
    newer = client.adapters.register("bandgap-head", record.architecture, changed)
    assert newer.version != record.version
    assert client.adapters.resolve("bandgap-head").version == newer.version  # newest by default
    assert client.adapters.resolve(f"bandgap-head@{record.version[:6]}").version == record.version


def test_bad_adapters_and_inputs_are_refused_at_no_cost(client, adapters, tmp_path):
    project = client.project_for(None)
    before = client.ledger.balances(project)
    x = np.ones((2, 6), np.float32)
    with pytest.raises(UnknownAdapter, match="known: .*spectrum-in"):
        client.embed([x], input_module="spectrum-inn")
    with pytest.raises(UnknownAdapter, match="no version 'ffff'"):
        client.embed([x], input_module="spectrum-in@ffff")
    with pytest.raises(InvalidRequest, match="input 0 has 7 features; input module .* takes 6"):
        client.embed([np.ones((2, 7), np.float32)], input_module="spectrum-in")
    narrow = Architecture(layers=[Linear(in_features=6, out_features=64)])
    client.adapters.register("narrow-in", narrow, narrow.build().state_dict())
    with pytest.raises(AdapterMismatch, match="64-wide embeddings; the core's hidden size is 128"):
        client.embed([x], input_module="narrow-in")
    with pytest.raises(AdapterMismatch, match="takes 6 features; the core's hidden size is 128"):
        client.embed([x], input_module="spectrum-in", head="spectrum-in")
    with pytest.raises(PlacementRefused, match="runs only on a site project"):
        client.embed([x], input_code="not really code")
    with pytest.raises(InvalidRequest, match="not floating point"):
        client.embed([np.ones((2, 6), np.int32)], input_module="spectrum-in")
    assert client.ledger.balances(project) == before


def test_weights_that_do_not_fit_the_architecture_or_are_pickled_are_refused(client, tmp_path):
    architecture = Architecture(layers=[Linear(in_features=6, out_features=HIDDEN)])
    with pytest.raises(AdapterMismatch, match=r"missing 0.bias \[128\]; 0.weight is \[128, 5\], expected \[128, 6\]"):
        client.adapters.register("bad", architecture, {"0.weight": torch.zeros(HIDDEN, 5)})
    pickled = tmp_path / "weights.pt"
    torch.save(architecture.build().state_dict(), pickled)
    with pytest.raises(AdapterMismatch, match="not a safetensors file"):
        client.adapters.register("bad", architecture, pickled)
    with pytest.raises(AdapterMismatch, match="takes 64 features but the layer before gives 32"):
        Architecture(layers=[Linear(in_features=6, out_features=32), Linear(in_features=64, out_features=8)]).out_features
    assert client.adapters.versions("bad") == []
