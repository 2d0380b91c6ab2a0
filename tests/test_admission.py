"""Joining a running task through the service: requests join a vLLM replica's running batch.

A replica runs one task at a time. Without admission, a request that arrives
while a long batch generates waits for that whole batch; with it, the worker
takes the request into its running engine at the next step and answers it
when it ends. These tests run the real path: the service on loopback, a local
site's endpoint worker with vLLM, the task's channel (a WebSocket). What a
forged or ended secret gets is tests/test_back_channel.py's.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests.service_helpers import served as served_on_loopback  # noqa: E402
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig  # noqa: E402
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome  # noqa: E402
from tpm_fed.identity import LocalUser  # noqa: E402

LONG = {"model": DEMO_MODEL_NAME, "prompt": "The river carries", "max_tokens": 200, "min_tokens": 200,
        "temperature": 0}
SHORT = {"model": DEMO_MODEL_NAME, "prompt": "A star", "max_tokens": 8, "min_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_model_dir):
    """A one-replica vLLM site behind the service: (url, headers, runtime)."""
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path_factory.mktemp("admission-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="admission-tests",
        sites=[SiteConfig(name="local")],  # one replica slot: a second task would wait for the first
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="vllm")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    with ServiceAssembly(home) as assembly:
        runtime = assembly.engine
        with served_on_loopback(assembly) as (url, token):
            headers = {"Authorization": f"Bearer {token}"}
            post(url, headers, SHORT)  # the replica is warm before any test times anything
            yield url, headers, runtime


def post(url: str, headers: dict, body: dict) -> dict:
    answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
    assert answer.status_code == 200, answer.text
    return answer.json()


def stream(url: str, headers: dict, body: dict, first: threading.Event | None = None) -> list[tuple[float, dict]]:
    """Each event's arrival time and chunk (the last one: usage and the ``tpm`` object); sets ``first``
    when the first text arrives."""
    arrived = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}, headers=headers,
                      timeout=600) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                arrived.append((time.perf_counter(), chunk))
                if first is not None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first.set()
    return arrived


def test_a_request_sent_while_a_long_batch_runs_joins_it_and_returns_before_it_ends(served):
    url, headers, runtime = served
    alone = post(url, headers, SHORT)  # the oracle: the same request on an idle replica
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(stream, url, headers, LONG, started)
        assert started.wait(300)
        sent = time.perf_counter()
        short = post(url, headers, SHORT)
        short_done = time.perf_counter()
        long_events = long.result(timeout=600)
    long_end = long_events[-1][0]
    # Not after the long batch: inside it, in well under half of what the long one still had to run.
    assert short_done - sent < (long_end - sent) / 2, "the short request waited for the long batch to end"
    assert short["choices"][0]["text"] == alone["choices"][0]["text"]  # greedy: the same tokens as alone
    assert short["usage"] == alone["usage"]
    long_chunk = long_events[-1][1]
    assert short["tpm"]["replica"] == long_chunk["tpm"]["replica"]  # the running replica took it in
    assert short["tpm"]["warm"] is True and short["tpm"]["charge"]["charged_su"] > 0
    record = runtime.request_record(short["tpm"]["request_id"])
    assert record["charge_state"] == "settled" and record["charged_su"] == short["tpm"]["charge"]["charged_su"]


def test_a_stream_sent_while_a_long_batch_runs_gets_its_first_token_at_once(served):
    url, headers, _ = served
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(stream, url, headers, LONG, started)
        assert started.wait(300)
        sent = time.perf_counter()
        late = stream(url, headers, {**SHORT, "max_tokens": 32, "min_tokens": 32})
        long_events = long.result(timeout=600)
    texts = [(at, chunk["choices"][0]["text"]) for at, chunk in late if chunk["choices"]]
    first_text = next(at for at, text in texts if text)
    assert first_text - sent < (long_events[-1][0] - sent) / 4  # not after the long batch
    assert len([text for _, text in texts if text]) > 2  # streamed, in pieces
    alone = post(url, headers, {**SHORT, "max_tokens": 32, "min_tokens": 32})
    assert "".join(text for _, text in texts) == alone["choices"][0]["text"]


def test_joined_requests_are_charged_once_each_whichever_answer_arrives_first(served, monkeypatch):
    """Early answers on the channel lost: the task's own result carries every joined request's outcome."""
    url, headers, runtime = served
    hub = runtime.channels
    deliver = hub.deliver
    monkeypatch.setattr(hub, "deliver", lambda token, chunks, outcomes=None, served=None: deliver(token, chunks))
    started = threading.Event()
    with ThreadPoolExecutor(5) as pool:
        long = pool.submit(stream, url, headers, {**LONG, "max_tokens": 120, "min_tokens": 120}, started)
        assert started.wait(300)
        shorts = [pool.submit(post, url, headers, {**SHORT, "prompt": prompt})
                  for prompt in ("A star", "The cell", "Water")]
        answers = [s.result(timeout=600) for s in shorts]
        long_events = long.result(timeout=600)
    monkeypatch.undo()
    replica = long_events[-1][1]["tpm"]["replica"]
    for prompt, answer in zip(("A star", "The cell", "Water"), answers, strict=True):
        assert answer["tpm"]["replica"] == replica
        assert answer["choices"][0]["text"] == post(url, headers, {**SHORT, "prompt": prompt})["choices"][0]["text"]
        record = runtime.request_record(answer["tpm"]["request_id"])
        assert record["charge_state"] == "settled" and record["charged_su"] == answer["tpm"]["charge"]["charged_su"]
