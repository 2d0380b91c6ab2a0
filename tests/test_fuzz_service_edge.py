"""Property-based fuzzing of the service's HTTP edge: never a 500, and refusals charge nothing.

Bodies sent to ``POST /tpm/v1/requests`` (any kind, in its wire form) and
``POST /v1/completions`` on the session's running service: valid bodies
bent out of shape (tests/wire_fuzzing.py), arbitrary JSON, and bytes that
are not JSON at all. For every one:

- the answer is 200, or a refusal in OpenAI's error body with a 4xx status
  (503 where no site can serve it now, e.g. a backend this site lacks);
  never a 500;
- a refusal leaves the ledger's statement exactly as it was;
- a 200 adds exactly one settled line to the statement: the answered request's.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire_fuzzing import json_values, mutated, valid_request_documents
from tpm_fed.home import DEMO_MODEL_NAME

EDGE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

NATIVE = valid_request_documents(DEMO_MODEL_NAME)
for _document in NATIVE.values():  # small answers: the fuzzer sends many
    if "max_new_tokens" in _document:
        _document["max_new_tokens"] = min(_document["max_new_tokens"], 2)
COMPLETION = {"model": DEMO_MODEL_NAME, "prompt": ["The telescope", "A star"], "max_tokens": 2,
              "temperature": 0.0, "stop": ["."], "seed": 1, "project": "tests", "min_tokens": 0}


def bodies(valid: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    as_json = (valid.flatmap(mutated) | json_values).map(lambda doc: json.dumps(doc).encode())
    return as_json | st.binary(max_size=40) | st.text(max_size=40).map(str.encode)


@pytest.fixture(scope="module")
def edge(service):
    with httpx.Client(base_url=service.url, headers={**service.headers, "Content-Type": "application/json"},
                      timeout=300) as client:
        yield client


def statement(runtime) -> list:
    return runtime.ledger.statement("tests")


def completion_request_id(response: httpx.Response) -> str:
    """The request id a completion carries, in one JSON answer or in each event of a stream."""
    if response.headers["content-type"].startswith("text/event-stream"):
        first = next(line for line in response.text.splitlines() if line.startswith("data: {"))
        return json.loads(first.removeprefix("data: "))["id"].removeprefix("cmpl-")
    return response.json()["tpm"]["request_id"]


def check_answer(response: httpx.Response, before: list, after: list, request_id_of) -> None:
    assert response.status_code != 500, response.text
    if response.status_code == 200:
        new = [charge for charge in after if charge not in before]
        assert [charge.request_id for charge in new] == [request_id_of(response)], new
        assert new[0].state == "settled"
        return
    assert 400 <= response.status_code < 500 or response.status_code == 503, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    assert after == before  # a refusal charges nothing, reserves nothing


@EDGE
@given(body=bodies(st.sampled_from(sorted(NATIVE)).map(NATIVE.__getitem__)))
def test_native_requests_route_answers_or_refuses_and_refusals_cost_nothing(body, edge, runtime):
    before = statement(runtime)
    response = edge.post("/tpm/v1/requests", content=body)
    check_answer(response, before, statement(runtime), lambda answer: answer.json()["request_id"])


@EDGE
@given(body=bodies(st.just(COMPLETION)))
def test_completions_route_answers_or_refuses_and_refusals_cost_nothing(body, edge, runtime):
    before = statement(runtime)
    response = edge.post("/v1/completions", content=body)
    check_answer(response, before, statement(runtime), completion_request_id)
