"""vLLM's own sampling extensions through the service's OpenAI routes, on the torch backend.

Each implemented one is checked against ``model.generate`` called directly with the same
settings; the ones the torch backend does not take are refused by name, for nothing.
(tests/test_sampling_extensions_vllm.py checks the vLLM backend against ``vllm.LLM``.)
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import GenerationRequest

PROMPT = "The cell"  # the demo model ends it with an end-of-sequence token after ~18 tokens


def _spent(runtime) -> int:
    return sum(balance.spent_usu + balance.reserved_usu for balance in runtime.ledger.balances())


def _direct(reference_model, prompt: str, max_new_tokens: int, **generate: object) -> list[int]:
    """``model.generate`` on one prompt with these settings: the oracle (no padding, no batch-mates)."""
    model, tokenizer = reference_model
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **generate)
    return output[0, ids.shape[1]:].tolist()


def _complete(service, **body: object) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/completions", headers=service.headers, timeout=120,
                      json={"model": DEMO_MODEL_NAME, "prompt": PROMPT, "temperature": 0, **body})


def test_ignore_eos_generates_exactly_max_tokens_as_generate_does_without_an_end(service, reference_model):
    without = _complete(service, max_tokens=40).json()
    assert without["usage"]["completion_tokens"] < 40 and without["choices"][0]["finish_reason"] == "stop"
    answer = _complete(service, max_tokens=40, ignore_eos=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["completion_tokens"] == 40 and body["choices"][0]["finish_reason"] == "length"
    expected = _direct(reference_model, PROMPT, 40, do_sample=False, eos_token_id=[])
    assert len(expected) == 40 and reference_model[1].eos_token_id in expected  # it ran through an end
    assert body["choices"][0]["text"] == reference_model[1].decode(expected, skip_special_tokens=True)


def test_ignore_eos_on_chat_and_when_streamed(service):
    chat = httpx.post(f"{service.url}/v1/chat/completions", headers=service.headers, timeout=120, json={
        "model": "demo-chat", "messages": [{"role": "user", "content": "The river"}], "max_tokens": 30,
        "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 30
    whole = _complete(service, max_tokens=30, ignore_eos=True).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{service.url}/v1/completions", headers=service.headers, timeout=120, json={
            "model": DEMO_MODEL_NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": 30, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as streamed:
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    import json
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 30


def test_min_tokens_holds_the_end_back(service):
    body = _complete(service, max_tokens=40, min_tokens=30).json()
    assert body["usage"]["completion_tokens"] >= 30


def test_greedy_repetition_penalty_equals_generate_called_directly(runtime, reference_model):
    prompt = "The river carries the river carries"
    plain = runtime.generate(prompt, max_new_tokens=24).result(timeout=120)
    result = runtime.generate(prompt, max_new_tokens=24, repetition_penalty=1.8, ignore_eos=True).result(timeout=120)
    expected = _direct(reference_model, prompt, 24, do_sample=False, repetition_penalty=1.8, eos_token_id=[])
    assert result.token_ids[0] == expected
    assert result.token_ids[0][:len(plain.token_ids[0])] != plain.token_ids[0]  # the penalty changed the answer


def test_seeded_top_k_sampling_is_the_top_k_generate_samples(runtime, reference_model):
    result = runtime.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_k=3, seed=7,
                              ignore_eos=True).result(timeout=120)
    torch.manual_seed(7)
    expected = _direct(reference_model, PROMPT, 16, do_sample=True, temperature=1.0, top_p=1.0, top_k=3,
                       eos_token_id=[])
    assert result.token_ids[0] == expected


def test_vllms_benchmark_payload_is_accepted(service):
    # What vllm bench serve's openai backend sends on its random dataset (its defaults).
    answer = _complete(service, max_tokens=8, repetition_penalty=1.0, logprobs=None, ignore_eos=True,
                       stream=True, stream_options={"include_usage": True})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("options", [{"include_usage": None}, {"include_usage": True, "continuous_usage_stats": False},
                                     {"continuous_usage_stats": None}])
def test_vllms_stream_options_are_accepted(service, options):
    with httpx.stream("POST", f"{service.url}/v1/completions", headers=service.headers, timeout=120, json={
            "model": DEMO_MODEL_NAME, "prompt": PROMPT, "temperature": 0, "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": options}) as streamed:
        assert streamed.status_code == 200, streamed.read()
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert any('"usage"' in line for line in lines) == bool(options.get("include_usage"))


def test_usage_in_every_chunk_is_refused_by_name_for_nothing(service, runtime):
    before = _spent(runtime)
    answer = _complete(service, max_tokens=4, stream=True,
                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert answer.status_code == 400, answer.text
    assert "continuous_usage_stats" in answer.json()["error"]["message"]
    assert _spent(runtime) == before


@pytest.mark.parametrize("field, value", [
    ("stop_token_ids", [5]), ("skip_special_tokens", False), ("spaces_between_special_tokens", False),
    ("include_stop_str_in_output", True),
])
def test_extensions_the_torch_backend_does_not_take_are_refused_by_name_for_nothing(service, runtime,
                                                                                   field, value):
    before = _spent(runtime)
    answer = _complete(service, max_tokens=4, **{field: value})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert field in message and "torch backend" in message and "vllm backend" in message
    assert _spent(runtime) == before


@pytest.mark.parametrize("field, value", [
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0), ("repetition_penalty", 50.0),
    ("stop_token_ids", [-1]), ("priority", 2**20), ("priority", -(2**20)), ("ignore_eoss", True),
])
def test_out_of_bounds_extensions_are_refused_at_the_edge_by_name(service, runtime, field, value):
    before = _spent(runtime)
    answer = _complete(service, max_tokens=4, **{field: value})
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["error"]["message"]
    assert _spent(runtime) == before


def test_the_contract_holds_the_bounds_and_one_spelling_of_off():
    assert GenerationRequest.create("x", "m", top_k=-1).set_extensions() == {}
    assert GenerationRequest.create("x", "m", ignore_eos=True, priority=3).set_extensions() == {
        "ignore_eos": True, "priority": 3}
    with pytest.raises(InvalidRequest, match="min_p"):
        GenerationRequest.create("x", "m", min_p=-0.1)


def test_vllms_own_benchmark_client_runs_unchanged_against_the_service(service, demo_model_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM's benchmark client comes with vLLM")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_vllm_client import CLIENT  # what `vllm bench serve` runs, without the console script

    done = subprocess.run(
        [sys.executable, "-c", CLIENT, "--backend", "openai", "--base-url", service.url, "--model", DEMO_MODEL_NAME,
         "--tokenizer", str(demo_model_dir), "--dataset-name", "random", "--random-input-len", "16",
         "--random-output-len", "8", "--num-prompts", "8", "--max-concurrency", "4", "--disable-tqdm",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json"],
        env={**os.environ, "OPENAI_API_KEY": service.token}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_output_tokens"] == 8 * 8  # ignore_eos (the random dataset's default): every token
