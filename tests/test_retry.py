"""A batch lost to its site is placed again once: the caller gets a normal result, charged once.

The runtime here is the real one (catalog, broker, bookkeeper, ledger,
dispatchers) with its one site replaced by a site whose tasks end only as
the test says, so each way a task can end is chosen, not hoped for.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from tests.test_dispatch import reply_for
from tpm_fed.protocol.errors import RemoteExecutionError, SiteError
from tpm_fed.sites.base import SiteStatus


class HeldSite:
    """A site (the federation's ``local`` one unless named), whose tasks finish only when the test says."""

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self.tasks: list[tuple[Future, list[dict]]] = []
        self.sent = threading.Condition()

    def submit(self, function, model, requests, context):
        future: Future = Future()
        with self.sent:
            self.tasks.append((future, requests))
            self.sent.notify_all()
        return future

    def task(self, index: int) -> tuple[Future, list[dict]]:
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.tasks) > index, timeout=30), f"task {index} never came"
            return self.tasks[index]

    def answer(self, index: int) -> None:
        future, requests = self.task(index)
        future.set_result(reply_for(requests))

    def fail(self, index: int, error: BaseException) -> None:
        self.task(index)[0].set_exception(error)

    def problem(self) -> str | None:
        return None

    def status(self) -> SiteStatus:
        return SiteStatus(self.name, "test", "running", 1, len(self.tasks))

    def shutdown(self) -> None:
        pass


@pytest.fixture
def held(home, tmp_path):
    from tpm_fed.service.runtime import Runtime

    with Runtime(home, database_url=f"sqlite:///{tmp_path / 'retry.db'}") as runtime:
        site = HeldSite()
        runtime.pool.sites["local"] = site
        yield runtime, site


def charges(runtime):
    return {c.request_id: c for c in runtime.ledger.statement()}


def nothing_reserved(runtime) -> bool:
    return all(b.reserved_usu == 0 for b in runtime.ledger.balances()) and \
        all(c.state != "reserved" for c in runtime.ledger.statement())


LOST = SiteError("site 'local': the worker running the task was lost (WorkerLost: worker 0)")


def test_a_batch_lost_with_its_worker_is_sent_again_and_charged_once(held):
    runtime, site = held
    futures = [runtime.generate(f"prompt {i}", max_new_tokens=1) for i in range(3)]
    first = {r["request_id"] for r in site.task(0)[1]}
    site.fail(0, LOST)
    again = {r["request_id"] for r in site.task(1)[1]}
    assert first <= again  # every request of the lost batch goes again (ones that came after may join it)
    site.answer(1)
    if len(first | again) < len(futures):  # on a busy machine a request missed both: it has its own task
        site.answer(2)
    results = [f.result(timeout=30) for f in futures]
    assert all(r.texts == ["ok"] and r.charge.charged_su > 0 for r in results)
    lines = charges(runtime)
    assert [lines[r.request_id].state for r in results] == ["settled"] * len(results)
    assert sum(c.charged_usu for c in lines.values()) == sum(b.spent_usu for b in runtime.ledger.balances())
    assert nothing_reserved(runtime)
    assert all(runtime.log.status_of(r.request_id) == "done" for r in results)
    assert len(site.tasks) == (2 if len(first | again) == len(futures) else 3)


def test_a_request_lost_twice_fails_typed_and_its_reservation_is_released(held):
    runtime, site = held
    future = runtime.generate("twice unlucky", max_new_tokens=1)
    site.fail(0, LOST)
    site.fail(1, LOST)
    with pytest.raises(SiteError, match="worker running the task was lost"):
        future.result(timeout=30)
    (line,) = charges(runtime).values()
    assert line.state == "released" and line.charged_usu == 0
    assert nothing_reserved(runtime)
    assert len(site.tasks) == 2
    assert runtime.broker.health.problem("local") is not None  # failed twice: avoided for a while, then probed


def test_a_request_that_named_its_site_is_not_moved(held):
    runtime, site = held
    future = runtime.generate("here only", max_new_tokens=1, site="local")
    site.fail(0, LOST)
    with pytest.raises(SiteError):
        future.result(timeout=30)
    assert len(site.tasks) == 1
    assert nothing_reserved(runtime)


def test_a_function_that_raised_is_not_run_again(held):
    runtime, site = held
    future = runtime.generate("raises", max_new_tokens=1)
    site.fail(0, RemoteExecutionError("site 'local': ValueError: no"))
    with pytest.raises(RemoteExecutionError):
        future.result(timeout=30)
    assert len(site.tasks) == 1
    assert nothing_reserved(runtime)
