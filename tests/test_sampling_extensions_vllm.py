"""vLLM's own sampling extensions through the service, on the vLLM backend, against ``vllm.LLM`` itself.

The oracle is vLLM called directly (``LLM.generate``) with the same ``SamplingParams``; the service
must hand each extension to the engine unchanged.
"""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install-vllm.sh cpu installs it)")

from tests.service_helpers import served  # noqa: E402
from tests.test_vllm_backend import direct_llm, vllm_assembly, vllm_home, vllm_runtime  # noqa: E402, F401 - fixtures
from tpm_fed.home import DEMO_MODEL_NAME  # noqa: E402

PROMPT = "The cell"


def _direct(llm, prompt: str, **sampling: object):
    from vllm import SamplingParams

    return llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def vllm_service(vllm_assembly):  # noqa: F811
    with served(vllm_assembly) as (url, token):
        yield url, {"Authorization": f"Bearer {token}"}


def _complete(vllm_service, **body: object) -> httpx.Response:
    url, headers = vllm_service
    return httpx.post(f"{url}/v1/completions", headers=headers, timeout=300,
                      json={"model": DEMO_MODEL_NAME, "prompt": PROMPT, "temperature": 0, **body})


def test_ignore_eos_gives_exactly_max_tokens_as_vllm_does(vllm_service, direct_llm):  # noqa: F811
    without = _complete(vllm_service, max_tokens=40).json()
    assert without["usage"]["completion_tokens"] < 40
    answer = _complete(vllm_service, max_tokens=40, ignore_eos=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["completion_tokens"] == 40 and body["choices"][0]["finish_reason"] == "length"
    direct = _direct(direct_llm, PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    assert body["choices"][0]["text"] == direct.text


def test_min_tokens_is_respected(vllm_service):
    assert _complete(vllm_service, max_tokens=40, min_tokens=30).json()["usage"]["completion_tokens"] >= 30


def test_greedy_repetition_penalty_equals_vllm_token_for_token(vllm_runtime, direct_llm):  # noqa: F811
    prompt = "The river carries the river carries"
    result = vllm_runtime.generate(prompt, max_new_tokens=24, repetition_penalty=1.8,
                                   ignore_eos=True).result(timeout=300)
    plain = vllm_runtime.generate(prompt, max_new_tokens=24, ignore_eos=True).result(timeout=300)
    direct = _direct(direct_llm, prompt, max_tokens=24, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    assert result.backend == "vllm" and result.token_ids[0] == list(direct.token_ids)
    assert result.token_ids[0] != plain.token_ids[0]  # the penalty changed the answer


def test_stop_token_ids_special_tokens_and_stop_strings_as_vllm(vllm_runtime, direct_llm):  # noqa: F811
    plain = _direct(direct_llm, PROMPT, max_tokens=16, temperature=0)
    stop_id = plain.token_ids[5]
    result = vllm_runtime.generate(PROMPT, max_new_tokens=16, stop_token_ids=[stop_id]).result(timeout=300)
    direct = _direct(direct_llm, PROMPT, max_tokens=16, temperature=0, stop_token_ids=[stop_id])
    assert result.token_ids[0] == list(direct.token_ids) and len(direct.token_ids) == 6
    assert result.completions[0].finish_reason != "length"
    kept = vllm_runtime.generate(PROMPT, max_new_tokens=40, ignore_eos=True,
                                 skip_special_tokens=False).result(timeout=300)
    assert kept.texts[0] == _direct(direct_llm, PROMPT, max_tokens=40, temperature=0, ignore_eos=True,
                                    skip_special_tokens=False).text
    stop = plain.text.split()[2]
    included = vllm_runtime.generate(PROMPT, max_new_tokens=16, stop=[stop],
                                     include_stop_str_in_output=True).result(timeout=300)
    assert included.texts[0].endswith(stop) and included.texts[0] == _direct(
        direct_llm, PROMPT, max_tokens=16, temperature=0, stop=[stop], include_stop_str_in_output=True).text


def test_seeded_top_k_min_p_sampling_equals_vllm(vllm_runtime, direct_llm):  # noqa: F811
    result = vllm_runtime.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_k=5, min_p=0.05, seed=11,
                                   ignore_eos=True).result(timeout=300)
    direct = _direct(direct_llm, PROMPT, max_tokens=16, temperature=1.0, top_k=5, min_p=0.05, seed=11,
                     ignore_eos=True)
    assert result.token_ids[0] == list(direct.token_ids)


def test_a_priority_is_taken(vllm_service):
    answer = _complete(vllm_service, max_tokens=4, priority=5)
    assert answer.status_code == 200, answer.text
