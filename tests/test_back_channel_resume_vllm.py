"""The back channel of a real vLLM task (the local site's worker) cut mid-stream (tests/tcp_proxy.py between
the worker and the service): the stream goes on with text equal to vLLM's alone, a request sent after the cut
joins the same running task, and each is charged once. The channel's own resume guarantees are
tests/test_back_channel_resume.py's."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests.test_back_channel_resume import Proxied, behind_proxy, wait_until
from tests.test_vllm_backend import direct_llm, vllm_assembly, vllm_home, vllm_runtime  # noqa: F401 - fixtures
from tpm_fed.home import DEMO_MODEL_NAME


@pytest.fixture(scope="module")
def vllm_proxied(vllm_assembly):  # noqa: F811
    with behind_proxy(vllm_assembly) as served:
        yield served


def stream(proxied: Proxied, body: dict, events: list) -> None:
    """Each SSE event's arrival time and JSON, into ``events`` as they come."""
    with httpx.stream("POST", f"{proxied.url}/v1/completions", headers=proxied.headers, timeout=300,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.perf_counter(), json.loads(line[6:])))


def texts(events: list) -> list[tuple[float, str, str | None]]:
    return [(at, e["choices"][0]["text"], e["choices"][0].get("finish_reason")) for at, e in events if e["choices"]]


LONG = {"model": DEMO_MODEL_NAME, "prompt": "The river carries", "max_tokens": 230, "ignore_eos": True,
        "temperature": 0}
JOINER = {"model": DEMO_MODEL_NAME, "prompt": "The cell", "max_tokens": 12, "ignore_eos": True, "temperature": 0}


def test_a_vllm_task_streams_and_takes_joiners_across_a_dropped_channel_each_charged_once(
        vllm_proxied, vllm_runtime, direct_llm):  # noqa: F811
    from vllm import SamplingParams

    warm = httpx.post(f"{vllm_proxied.url}/v1/completions", headers=vllm_proxied.headers, timeout=300,
                      json={**JOINER, "max_tokens": 2})
    assert warm.status_code == 200, warm.text  # the replica loaded, its first task done
    long_events: list = []
    joiner_events: list = []
    streaming = threading.Thread(target=stream, args=(vllm_proxied, LONG, long_events))
    streaming.start()
    wait_until(lambda: any(text for _, text, _ in texts(long_events)), lambda: long_events, 120)
    cut_at, accepted = time.perf_counter(), vllm_proxied.proxy.connections_accepted
    vllm_proxied.proxy.cut()
    stream(vllm_proxied, JOINER, joiner_events)  # reaches the service while the long task runs
    streaming.join(300)
    direct = direct_llm.generate([LONG["prompt"], JOINER["prompt"]],
                                 [SamplingParams(max_tokens=230, temperature=0, ignore_eos=True),
                                  SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)], use_tqdm=False)
    long_texts, joiner_texts = texts(long_events), texts(joiner_events)
    assert "".join(text for _, text, _ in long_texts) == direct[0].outputs[0].text  # nothing lost or doubled
    assert "".join(text for _, text, _ in joiner_texts) == direct[1].outputs[0].text
    # Text kept streaming after the cut, not all of it with the final result...
    after_cut = [text for at, text, finish in long_texts if at > cut_at and finish is None and text]
    assert len(after_cut) >= 2, (len(long_texts), long_texts[-3:])
    # ...through the same task's channel opened again; and the joiner ran on that task, ending before it.
    assert vllm_proxied.proxy.connections_accepted > accepted
    assert joiner_events[-1][0] < long_events[-1][0]
    # Each charged once: one settled charge each, as its stream said, and nothing left reserved.
    usage = {e["tpm"]["request_id"]: e for _, e in long_events + joiner_events if not e["choices"]}
    assert len(usage) == 2
    rows = [row for row in vllm_runtime.statement("tests") if row["request_id"] in usage]
    assert sorted(row["request_id"] for row in rows) == sorted(usage)
    for row in rows:
        assert row["state"] == "settled"
        assert row["charged_su"] == usage[row["request_id"]]["tpm"]["charge"]["charged_su"]
    assert all(balance["reserved_su"] == 0 for balance in vllm_runtime.balances("tests"))


def test_a_worker_that_cannot_reopen_its_channel_ends_as_before_and_charges_each_request_once(
        vllm_proxied, vllm_runtime, direct_llm):  # noqa: F811
    """The link stays down (the proxy refuses every connection from now on): the worker tries a few times, then
    goes on without its channel (as every task did after a drop before); the final result carries the text, and
    a request sent meanwhile is served once: taken for the running task and never read by its worker, it is
    handed back at the task's end and served by the next one (which has no channel either). A regression test
    of the fallback: it passes on the code before resuming too."""
    from vllm import SamplingParams

    long_events: list = []
    streaming = threading.Thread(target=stream, args=(vllm_proxied, LONG, long_events))
    streaming.start()
    wait_until(lambda: any(text for _, text, _ in texts(long_events)), lambda: long_events, 120)
    vllm_proxied.proxy.close()  # cuts the channel, and no socket reaches the service through it again
    joiner = httpx.post(f"{vllm_proxied.url}/v1/completions", headers=vllm_proxied.headers, timeout=300, json=JOINER)
    streaming.join(300)
    assert joiner.status_code == 200, joiner.text
    direct = direct_llm.generate([LONG["prompt"], JOINER["prompt"]],
                                 [SamplingParams(max_tokens=230, temperature=0, ignore_eos=True),
                                  SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)], use_tqdm=False)
    assert "".join(text for _, text, _ in texts(long_events)) == direct[0].outputs[0].text
    assert joiner.json()["choices"][0]["text"] == direct[1].outputs[0].text
    charged = {e["tpm"]["request_id"]: e["tpm"]["charge"]["charged_su"] for _, e in long_events if not e["choices"]}
    charged[joiner.json()["tpm"]["request_id"]] = joiner.json()["tpm"]["charge"]["charged_su"]
    rows = [row for row in vllm_runtime.statement("tests") if row["request_id"] in charged]
    assert sorted(row["request_id"] for row in rows) == sorted(charged)  # one charge each
    assert all(row["state"] == "settled" and row["charged_su"] == charged[row["request_id"]] for row in rows)
    assert all(balance["reserved_su"] == 0 for balance in vllm_runtime.balances("tests"))
