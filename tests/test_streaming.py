"""Tokens streamed as they are made: from the worker over the back channel, to the caller as SSE.

The channel's own guarantees (secrets, bounds, pushes) are tests/test_back_channel.py's."""

from __future__ import annotations

import json
import time

import httpx
import pytest

LONG = {"model": "demo-llama", "prompt": "The river carries", "max_tokens": 48, "min_tokens": 48,
        "temperature": 0}


def events(service, body: dict, path: str = "/v1/completions") -> list[tuple[float, dict]]:
    """Each SSE event's arrival time and JSON (the final [DONE] left out)."""
    arrived = []
    with httpx.stream("POST", f"{service.url}{path}", json=body, headers=service.headers, timeout=300) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrived.append((time.perf_counter(), json.loads(line[6:])))
    return arrived


def test_chunks_arrive_while_generating_and_add_up_to_the_greedy_completion(service, runtime):
    plain = httpx.post(f"{service.url}/v1/completions", json=LONG, headers=service.headers, timeout=300).json()
    arrived = events(service, {**LONG, "stream": True, "stream_options": {"include_usage": True}})
    texts = [(at, chunk["choices"][0]["text"]) for at, chunk in arrived if chunk["choices"]]
    assert len([text for _, text in texts if text]) > 2  # not one whole answer: pieces, as they were made
    assert texts[0][0] < texts[-1][0]
    assert "".join(text for _, text in texts) == plain["choices"][0]["text"]
    final = [chunk for _, chunk in arrived if chunk["choices"]][-1]
    assert final["choices"][0]["finish_reason"] == "length" and final["tpm"]["streamed"] is True
    (usage,) = [chunk for _, chunk in arrived if not chunk["choices"]]
    assert usage["usage"] == plain["usage"]
    record = runtime.request_record(usage["tpm"]["request_id"])
    assert record["charge_state"] == "settled" and record["charged_su"] == usage["tpm"]["charge"]["charged_su"]


def test_the_official_openai_client_reads_the_token_stream(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.url}/v1", api_key=service.token, max_retries=0)
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model="demo-llama", prompt="The river carries", max_tokens=24, temperature=0, stream=True) if chunk.choices]
    whole = client.completions.create(model="demo-llama", prompt="The river carries", max_tokens=24, temperature=0)
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == whole.choices[0].text


def test_chat_streams_pieces_with_the_role_first(service):
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "The cell"}], "max_tokens": 24,
            "min_tokens": 24, "temperature": 0}
    plain = httpx.post(f"{service.url}/v1/chat/completions", json=body, headers=service.headers, timeout=300).json()
    deltas = [chunk["choices"][0]["delta"] for _, chunk in events(service, {**body, "stream": True},
                                                                  "/v1/chat/completions")]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert len([d for d in deltas if d.get("content")]) > 1
    assert "".join(d.get("content", "") for d in deltas) == plain["choices"][0]["message"]["content"]


def test_a_worker_that_cannot_reach_the_service_sends_it_all_at_the_end(service, runtime, monkeypatch):
    hub = runtime.channels
    opened = hub.open

    def unreachable(request_ids, joins=None):
        channel = opened(request_ids, joins)
        return channel and {**channel, "url": "http://127.0.0.1:9/tpm/v1/channel"}  # the discard port: refused

    monkeypatch.setattr(hub, "open", unreachable)
    arrived = [chunk for _, chunk in events(service, {**LONG, "max_tokens": 8, "min_tokens": 8, "stream": True})]
    plain = httpx.post(f"{service.url}/v1/completions", json={**LONG, "max_tokens": 8, "min_tokens": 8},
                       headers=service.headers, timeout=300).json()
    assert len(arrived) == 1 and arrived[0]["tpm"]["streamed"] is False
    assert arrived[0]["choices"][0]["text"] == plain["choices"][0]["text"]


def test_text_deltas_hold_back_what_a_stop_string_or_a_half_character_could_change():
    from functions.text_deltas import TextDeltas

    # 6 decodes as a half character (a real tokenizer completes it with the next piece).
    pieces = {1: "The", 2: " end", 3: " E", 4: "ND", 5: " here", 6: "\ufffd", 7: "\u00e9", 9: "<eos>"}

    def decode(ids: list[int]) -> str:
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffd\u00e9", "\u00e9")

    rows = [("a", 0, 10, [" END"]), ("b", 0, 2, []), None, ("c", 1, 10, [])]
    deltas = TextDeltas(rows, decode, eos_token_ids={9})
    sent: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    for step in ([1, 1, 1, 1], [2, 2, 2, 6], [3, 2, 2, 7], [4, 5, 5, 9], [5, 5, 5, 5]):
        for chunk in deltas.step(step):
            sent[chunk["request_id"]].append(chunk["text"])
    assert "".join(sent["a"]) == "The end"  # " E" was held back (it could begin " END"), then the stop cut it
    assert sent["b"] == ["The", " end"]  # its max_new_tokens (2) ended it, though the batch ran on
    assert sent["c"] == ["The", "\u00e9"]  # the half character waited for its other half; then end of sequence
    assert deltas.done == [True, True, True, True]


def test_the_python_client_iterates_the_text_then_knows_usage_and_charge(http_client):
    stream = http_client.stream("The river carries", "demo-llama", max_new_tokens=24, min_new_tokens=24)
    pieces = list(stream)
    whole = http_client.generate("The river carries", "demo-llama", max_new_tokens=24, min_new_tokens=24).result()
    assert len(pieces) > 1 and "".join(pieces) == whole.texts[0]
    assert stream.usage["completion_tokens"] == whole.usage.completion_tokens == 24
    assert stream.finish_reason == "length" and stream.tpm["streamed"] is True
    assert stream.tpm["version"] == whole.version and stream.tpm["charge"]["charged_su"] > 0


def test_a_refused_stream_is_a_typed_error_before_any_text(http_client):
    from tpm_fed.protocol.errors import UnknownModel

    with pytest.raises(UnknownModel):
        list(http_client.stream("The river", "no-such-model", max_new_tokens=4))


def test_a_caller_who_leaves_mid_stream_stops_its_generation_and_pays_once_for_what_ran(service, runtime):
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "demo-llama", "prompt": "The river carries", "max_tokens": 200, "min_tokens": 200,
            "temperature": 0, "stream": True}

    def leave_after_first_text() -> str:
        with httpx.stream("POST", f"{service.url}/v1/completions", json=body, headers=service.headers,
                          timeout=300) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    return json.loads(line[6:])["id"].removeprefix("cmpl-")  # then the connection closes
        raise AssertionError("no text came")

    def stay() -> str:
        return "".join(chunk["choices"][0]["text"] for _, chunk in events(service, {**body, "max_tokens": 40,
                                                                                    "min_tokens": 40}))

    with ThreadPoolExecutor(2) as pool:
        left, stayed = pool.submit(leave_after_first_text), pool.submit(stay)
        request_id, text = left.result(timeout=300), stayed.result(timeout=300)
    whole = httpx.post(f"{service.url}/v1/completions", headers=service.headers, timeout=300,
                       json={**body, "stream": False, "max_tokens": 40, "min_tokens": 40}).json()
    assert text == whole["choices"][0]["text"]  # the one who stayed got all of it

    deadline = time.monotonic() + 120
    while (record := runtime.request_record(request_id)) is None or record["charge_state"] == "reserved":
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert record["charge_state"] == "settled"
    assert 0 < record["completion_tokens"] < 200  # stopped early, charged for what ran
    lines = [c for c in runtime.ledger.statement("tests") if c.request_id == request_id]
    assert len(lines) == 1 and lines[0].charged_usu > 0
