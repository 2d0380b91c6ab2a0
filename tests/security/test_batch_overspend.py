"""Batches created at the same instant cannot together promise more than their project has.

Issue 24, suspected: a batch's quote was checked against the project's balance as the ledger had it,
and a batch's lines reserve only when they run, so two batches created at once (or back to back,
before the first ran) each passed against the whole balance. The ledger still refused the lines it
could not pay (no money was overspent), but the second batch was accepted with a promise it could
not keep and its lines then failed. Now the check is in the transaction that records the batch,
against the balance less what the project's open batches have yet to run.
"""

from __future__ import annotations

import io
import threading

import httpx
import openai
import pytest

from tests.batch_helpers import batch_home, jsonl
from tests.service_helpers import openai_client, served
from tpm_fed.home import DEMO_MODEL_NAME

GRANT_SU = 20.0


def _lines(count: int) -> list[dict]:
    return [{"custom_id": f"l{index}", "method": "POST", "url": "/v1/completions",
             "body": {"model": DEMO_MODEL_NAME, "prompt": f"The cell {index:04d}", "max_tokens": 64}}
            for index in range(count)]


@pytest.fixture(scope="module")
def client(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(batch_home(tmp_path_factory.mktemp("overspend"), demo_model_dir, grant_su=GRANT_SU)) as assembly:
        with served(assembly) as (url, token):
            yield openai_client(url, token), (url, token)


def _bound(client, address, lines: list[dict]) -> tuple[str, float, float]:
    """An uploaded file of ``lines``, its bound at the local site, and what the project has there."""
    url, token = address
    file_id = client.files.create(file=("q.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
    quote = httpx.post(f"{url}/v1/quotes", json={"input_file_id": file_id},
                       headers={"Authorization": f"Bearer {token}"}, timeout=120).json()
    return file_id, quote["max_su_per_site"]["local"], quote["available_su"]["local"]


def _file_the_balance_holds_once(client, address) -> str:
    """A file of as many lines as the project's balance holds (a bound over half the balance)."""
    # A bound is so much a line plus a cold start per replica that may start (two here): fit it on 10 and 20 lines.
    _, ten, _ = _bound(client, address, _lines(10))
    _, twenty, available = _bound(client, address, _lines(20))
    per_line = (twenty - ten) / 10
    fixed = ten - 10 * per_line
    file_id, bound, available = _bound(client, address, _lines(int((available - fixed) / per_line) - 1))
    assert available / 2 < bound <= available, (bound, available)  # one fits, two do not
    return file_id


def test_two_batches_created_at_once_cannot_together_exceed_the_balance(client):
    client, address = client
    file_id = _file_the_balance_holds_once(client, address)

    outcomes: list[object] = []
    start = threading.Barrier(2)

    def create() -> None:
        start.wait()
        try:
            outcomes.append(client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                  completion_window="24h"))
        except openai.RateLimitError as refused:  # 429 insufficient_quota
            outcomes.append(refused)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    accepted = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(accepted) == 1 and len(refused) == 1, outcomes
    assert "cannot pay for this batch" in str(refused[0])
    client.batches.cancel(accepted[0].id)


def test_a_second_batch_after_the_first_is_refused_while_the_first_has_lines_to_run(client):
    client, address = client
    file_id = _file_the_balance_holds_once(client, address)
    first = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError, match="cannot pay for this batch"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    client.batches.cancel(first.id)
