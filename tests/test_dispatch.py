"""The dispatcher on its own: batching under load, and tasks that never answer."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from tpm_fed.dispatch import BatchingDispatcher
from tpm_fed.protocol.errors import SiteError
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.sites.base import SiteStatus


class HeldSite:
    """A site whose tasks finish only when the test says (or never)."""

    name = "held"

    def __init__(self) -> None:
        self.tasks: list[tuple[Future, list[dict]]] = []
        self.sent = threading.Event()

    def submit(self, function, model, requests, context):
        future: Future = Future()
        self.tasks.append((future, requests))
        self.sent.set()
        return future

    def status(self) -> SiteStatus:
        return SiteStatus(self.name, "test", "running", 1, len(self.tasks))

    def shutdown(self) -> None:
        pass


def reply_for(requests):
    return {
        "replica": {"replica_id": "r", "host": "h", "pid": 1, "warm": True, "batch_size": len(requests)},
        "backend": "torch", "load_s": 0.0, "run_s": 0.01, "notes": [],
        "outcomes": [{"result": {"completions": [{"text": "ok", "token_ids": [1], "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1}}} for _ in requests],
    }


SPEC = ModelSpec(name="m", version="v", path="/nowhere")


def request(text="x"):
    return GenerationRequest.create(text, "m", max_new_tokens=1)


def test_requests_arriving_while_busy_leave_together():
    site = HeldSite()
    dispatcher = BatchingDispatcher(site, SPEC, max_batch=64, max_in_flight=1)
    first = dispatcher.submit(request())
    later = [dispatcher.submit(request()) for _ in range(5)]
    assert len(site.tasks) == 1 and len(site.tasks[0][1]) == 1
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert first.result(timeout=5).texts == ["ok"]
    assert len(site.tasks) == 2 and len(site.tasks[1][1]) == 5  # the five went out as one batch
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert all(f.result(timeout=5).replica.batch_size == 5 for f in later)


def test_a_task_that_never_answers_fails_with_a_site_error_and_frees_the_worker():
    site = HeldSite()
    dispatcher = BatchingDispatcher(site, SPEC, max_batch=64, max_in_flight=1, task_timeout_s=0.2)
    lost = dispatcher.submit(request())
    with pytest.raises(SiteError, match="no answer within 0.2 s"):
        lost.result(timeout=5)
    after = dispatcher.submit(request())  # the slot was freed: this one is sent
    assert site.sent.wait(5) and len(site.tasks) == 2
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))  # the late answer is dropped
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert after.result(timeout=5).texts == ["ok"]


def test_batches_are_capped_by_bytes_as_well_as_by_count():
    from tpm_fed.protocol.limits import MAX_PAYLOAD_BYTES

    site = HeldSite()
    dispatcher = BatchingDispatcher(site, SPEC, max_batch=64, max_in_flight=1)
    dispatcher.submit(request())
    big = "word " * (MAX_PAYLOAD_BYTES // 5 // 3)  # a third of a task each
    waiting = [dispatcher.submit(request(big)) for _ in range(4)]
    site.tasks[0][0].set_result(reply_for(site.tasks[0][1]))
    assert [len(requests) for _, requests in site.tasks[1:]] == [2]  # two fit; the next two wait
    site.tasks[1][0].set_result(reply_for(site.tasks[1][1]))
    assert [len(requests) for _, requests in site.tasks[2:]] == [2]
    site.tasks[2][0].set_result(reply_for(site.tasks[2][1]))
    assert all(f.result(timeout=5).texts == ["ok"] for f in waiting)
