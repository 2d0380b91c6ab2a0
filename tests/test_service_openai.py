"""The OpenAI-compatible routes, driven by the official ``openai`` client over real HTTP on loopback."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
import torch

from tests.test_generation import direct_greedy
from tpm_fed.home import DEMO_MODEL_NAME

@pytest.fixture(scope="module")
def openai_client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.token, max_retries=0)


def _spent(runtime) -> int:
    return sum(balance.spent_usu + balance.reserved_usu for balance in runtime.ledger.balances())


def test_greedy_completion_equals_the_backend_called_directly(openai_client, reference_model):
    prompt = "The climate model runs on many nodes"
    answer = openai_client.completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
    expected = direct_greedy(reference_model, [prompt], 16)[0]
    assert answer.choices[0].text == reference_model[1].decode(expected, skip_special_tokens=True)
    assert answer.usage.completion_tokens == len(expected)
    assert answer.usage.prompt_tokens == len(reference_model[1](prompt)["input_ids"])
    tpm = answer.model_extra["tpm"]
    assert tpm["backend"] == "torch" and tpm["site"] == "local" and len(tpm["version"]) >= 16
    assert tpm["charge"]["charged_su"] > 0 and tpm["charge"]["project"] == "tests"


def test_several_prompts_come_back_as_choices_in_order(openai_client, reference_model):
    prompts = ["The cell", "A scientist can reproduce a result when"]
    answer = openai_client.completions.create(model=DEMO_MODEL_NAME, prompt=prompts, max_tokens=8, temperature=0)
    expected = direct_greedy(reference_model, prompts, 8)
    texts = [reference_model[1].decode(ids, skip_special_tokens=True) for ids in expected]
    assert [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)] == texts


def test_tpm_parameters_travel_as_extra_body_fields(openai_client):
    answer = openai_client.completions.create(
        model=DEMO_MODEL_NAME, prompt="The cell", max_tokens=2, temperature=0,
        extra_body={"project": "tests", "site": "local", "explain": True})
    assert "placed on local" in answer.model_extra["tpm"]["placement"]


def test_stream_carries_the_same_text_and_the_usage_when_asked(openai_client):
    prompt = "The river carries"
    whole = openai_client.completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(openai_client.completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=12,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    without_usage = list(openai_client.completions.create(model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=12,
                                                          temperature=0, stream=True))
    assert all(c.usage is None for c in without_usage)


def test_models_lists_versions_kinds_and_warmth(openai_client, runtime):
    openai_client.completions.create(model=DEMO_MODEL_NAME, prompt="The", max_tokens=1, temperature=0)
    models = {m.id: m for m in openai_client.models.list().data}
    demo = models[DEMO_MODEL_NAME].model_extra["tpm"]
    assert demo["version"] == runtime.catalog.resolve_name(DEMO_MODEL_NAME).spec.version
    assert set(demo["kinds"]) == {"generate", "embed", "trace"}
    assert demo["sites"]["local"] == "hot"


def test_embeddings_are_the_mean_of_the_final_hidden_states(openai_client, reference_model):
    model, tokenizer = reference_model
    texts = ["The cell divides", "A telescope"]
    answer = openai_client.embeddings.create(model=DEMO_MODEL_NAME, input=texts)
    for text, item in zip(texts, sorted(answer.data, key=lambda d: d.index), strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0]
        assert torch.allclose(torch.tensor(item.embedding), hidden.mean(dim=0), atol=1e-5)
    assert answer.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert "mean" in answer.model_extra["tpm"]["pooling"]


@pytest.fixture(scope="module")
def chat_model(home):
    """The demo model with a chat template (the session federation's ``demo-chat``)."""
    return home.models_dir / "demo-chat"


def test_chat_uses_the_models_template_exactly_as_its_tokenizer(openai_client, chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cell"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in output:
        output = output[: output.index(tokenizer.eos_token_id)]
    answer = openai_client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == tokenizer.decode(output, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == ids.shape[1]


def test_chat_streams_a_role_then_the_text(openai_client, chat_model):
    messages = [{"role": "user", "content": "The river"}]
    whole = openai_client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=6, temperature=0)
    chunks = list(openai_client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=6,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_model_without_a_chat_template_is_refused_clearly(openai_client, runtime):
    before = _spent(runtime)
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        openai_client.chat.completions.create(model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert _spent(runtime) == before


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": DEMO_MODEL_NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": DEMO_MODEL_NAME, "prompt": "x", "temprature": 0}, 400, "temprature: unknown parameter"),
    ({"model": DEMO_MODEL_NAME, "prompt": "x", "n": 2}, 400, "only n=1"),
    ({"model": DEMO_MODEL_NAME, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": DEMO_MODEL_NAME, "prompt": [1, 2, 3]}, 400, "token-id prompts"),
    ({"model": DEMO_MODEL_NAME, "prompt": ""}, 400, "empty"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "unknown model"),
    ({"model": f"{DEMO_MODEL_NAME}@ffffffff", "prompt": "x"}, 404, "no version"),
    ({"model": DEMO_MODEL_NAME, "prompt": "The cell " * 400, "max_tokens": 8}, 400, "context"),
    ({"model": DEMO_MODEL_NAME, "prompt": "x", "project": "someone-elses"}, 403, "not a member"),
])
def test_bad_input_gets_an_openai_error_and_costs_nothing(service, runtime, body, status, says):
    before = _spent(runtime)
    answer = httpx.post(f"{service.url}/v1/completions", json=body, headers=service.headers, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["type"]
    assert _spent(runtime) == before
    assert httpx.post(f"{service.url}/v1/completions", headers=service.headers, timeout=60,
                      json={"model": DEMO_MODEL_NAME, "prompt": "The", "max_tokens": 1}).status_code == 200


def test_malformed_json_is_a_400_in_openai_shape(service):
    answer = httpx.post(f"{service.url}/v1/completions", content=b'{"model": "demo-llama", "prompt": ',
                        headers={**service.headers, "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]["message"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(service):
    with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {service.token}\r\n".encode()
                           + b"Content-Length: 50000000\r\n\r\n{\"model\":")  # 50 MB promised, 9 bytes sent
        reply = _read_all(connection)
    assert reply.startswith("HTTP/1.1 413") and "50,000,000" in reply


def test_a_client_that_never_finishes_its_body_is_timed_out(service, monkeypatch):
    import tpm_fed.service.limits as limits

    monkeypatch.setattr(service.body_limits, "timeout_s", 0.5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {service.token}\r\n".encode()
                           + b"Content-Length: 100\r\n\r\n{\"model\":")
        connection.settimeout(10)
        reply = _read_all(connection)
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - started < 5
    assert limits.BODY_TIMEOUT_S == 30.0  # the default stays for everyone else


def _read_all(connection: socket.socket) -> str:
    """Everything the server sends until it closes the connection."""
    connection.settimeout(10)
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_client_that_disconnects_is_charged_once_for_what_ran(service, runtime):
    before = {c.request_id for c in runtime.ledger.statement()}
    # 200 forced tokens take far longer than the 50 ms the caller waits before hanging up.
    request = {"kind": "generate", "model": {"name": DEMO_MODEL_NAME}, "prompts": ["The cell"],
               "max_new_tokens": 200, "min_new_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{service.url}/tpm/v1/requests", headers=service.headers, json=request,
                   timeout=httpx.Timeout(5, read=0.05))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [c for c in runtime.ledger.statement() if c.request_id not in before]
        if new and all(c.state != "reserved" for c in new):
            break
        time.sleep(0.1)
    assert len(new) == 1 and new[0].state == "settled" and new[0].charged_usu > 0


def test_no_token_and_a_wrong_token_are_401(service):
    body = {"model": DEMO_MODEL_NAME, "prompt": "x"}
    assert httpx.post(f"{service.url}/v1/completions", json=body).status_code == 401
    wrong = httpx.post(f"{service.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"


def test_the_openapi_schema_is_served(service):
    schema = httpx.get(f"{service.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tpm/v1/requests"} <= set(schema["paths"])
