"""A request id a caller chooses is bounded where it enters: at most 64 of ``[A-Za-z0-9_.:-]``.

Issue 24, suspected: caller-chosen request ids had no length limit. Every table keeps ids as
``String(64)``: SQLite (the embedded default) stores a longer one anyway, and PostgreSQL refuses it
(``value too long for type character varying(64)``) in the middle of recording the request, a 500
after placement. Now the request's own model refuses it (400, typed, nothing charged) on every
route that takes a request's wire form, before anything is recorded, on either database.
"""

from __future__ import annotations

import httpx
import pytest

from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.requests import GenerationRequest


def _request(request_id: str) -> dict:
    return {"kind": "generate", "model": {"name": DEMO_MODEL_NAME}, "prompts": ["The cell"], "max_new_tokens": 2,
            "request_id": request_id}


@pytest.mark.parametrize("request_id", ["x" * 65, "a" * 10_000, "../../etc", "id with spaces", "line\nbreak", ""])
def test_a_bad_request_id_is_refused_before_anything_is_recorded(service, runtime, request_id):
    before = len(runtime.ledger.statement())
    for path in ("/tpm/v1/requests", "/tpm/v1/quotes"):
        answer = httpx.post(f"{service.url}{path}", headers=service.headers, json=_request(request_id), timeout=60)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "InvalidRequest" and "request_id" in answer.text
    assert len(runtime.ledger.statement()) == before
    assert runtime.request_record(request_id) is None


def test_an_id_of_64_allowed_characters_is_taken(service, runtime):
    request_id = "caller-chosen:0123456789_abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLM"[:64]
    assert len(request_id) == 64
    answer = httpx.post(f"{service.url}/tpm/v1/requests", headers=service.headers, json=_request(request_id),
                        timeout=120)
    assert answer.status_code == 200, answer.text
    assert runtime.request_record(request_id) is not None


def test_the_contract_refuses_it_in_process_too():
    with pytest.raises(InvalidRequest, match="request_id"):
        GenerationRequest.create("x", DEMO_MODEL_NAME, request_id="x" * 65)
