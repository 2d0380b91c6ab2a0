"""At a batch's end a replica with a free worker takes batch lines still waiting for a busy sibling (work
stealing), so one site does not run a last task while the other idles; each line is still charged once,
where it ran.

The engine here is the real one (catalog, broker, bookkeeper, ledger, dispatchers, replica pool) over two
sites whose tasks end only when the test says, so which lines wait where is chosen, not hoped for.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_retry import HeldSite
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.protocol.requests import GenerationRequest

TASK = 4  # lines per task at both sites


def carried(site: HeldSite, index: int) -> list[str]:
    """The request ids task ``index`` of ``site`` carries (waiting for it to be sent)."""
    return [r["request_id"] for r in site.task(index)[1]]


@pytest.fixture
def two_sites(tmp_path, demo_model_dir):
    from tpm_fed.service.runtime import Runtime

    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="stealing",
        sites=[SiteConfig(name=name, max_batch_requests=TASK) for name in ("a", "b")],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="p", members=[LocalUser().current()], allocations={"a": 100.0, "b": 100.0})],
    ).dump(home.federation_file)
    with Runtime(home) as runtime:
        sites = {name: HeldSite(name) for name in ("a", "b")}
        runtime.pool.sites.update(sites)
        yield runtime, sites["a"], sites["b"]


def line(text: str = "x", **fields) -> GenerationRequest:
    return GenerationRequest.create(text, DEMO_MODEL_NAME, max_new_tokens=1, **fields)


def warm(runtime, site: HeldSite, task: int) -> None:
    """A replica at ``site``, warm (its first task answered)."""
    future = runtime.submit(line(site=site.name))
    site.answer(task)
    future.result(timeout=30)


def test_a_free_worker_takes_the_batch_lines_waiting_for_a_busy_sibling_each_charged_once_where_it_ran(two_sites):
    runtime, a, b = two_sites
    warm(runtime, a, 0)
    with runtime.burst():  # a batch's window of lines: all placed on a's warm replica (b has none yet)
        lines = [line(f"line {i}") for i in range(2 * TASK)]
        futures = [runtime.submit(r, background=True) for r in lines]
    ids = [r.request_id for r in lines]
    assert carried(a, 1) == ids[:TASK]  # a runs the first four; the other four wait behind it
    warm(runtime, b, 0)  # b's replica starts (its own request); its worker comes back free
    assert carried(b, 1) == ids[TASK:]  # and takes the four lines a had not started
    b.answer(1)
    a.answer(1)
    results = [future.result(timeout=30) for future in futures]
    assert [r.site for r in results] == ["a"] * TASK + ["b"] * TASK
    charged = {c.request_id: c for c in runtime.ledger.statement()}
    assert [charged[rid].site for rid in ids] == ["a"] * TASK + ["b"] * TASK
    assert all(charged[rid].state == "settled" and charged[rid].charged_usu > 0 for rid in ids)
    assert [runtime.log.status_of(rid) for rid in ids] == ["done"] * len(ids)
    assert all(amount == 0 for amount in runtime.broker.balances._held.values())  # every hold moved and ended
    assert all(b.reserved_usu == 0 for b in runtime.ledger.balances())
    assert all(r.queue_depth == 0 for r in runtime.broker.registry.all())
    assert len(a.tasks) == 2 and len(b.tasks) == 2


def test_lines_that_named_their_site_and_interactive_requests_stay_where_they_were_placed(two_sites):
    runtime, a, b = two_sites
    warm(runtime, a, 0)
    with runtime.burst():
        named = [line(f"named {i}", site="a") for i in range(2 * TASK)]
        futures = [runtime.submit(r, background=True) for r in named]
    assert carried(a, 1) == [r.request_id for r in named[:TASK]]
    warm(runtime, b, 0)
    a.answer(1)
    assert carried(a, 2) == [r.request_id for r in named[TASK:]]  # still a's: b took none of them
    a.answer(2)
    assert {f.result(timeout=30).site for f in futures} == {"a"}
    assert len(b.tasks) == 1


def test_a_failing_borrow_never_keeps_a_worker_slot_from_coming_back():
    """Taking lines from a sibling happens as a slot comes back: whatever goes wrong there, the slot is freed
    (the one place a slot is freed must not be skipped), and the next request leaves."""
    from tests.test_dispatch import SPEC, request
    from tpm_fed.engine.dispatcher import ReplicaDispatcher

    def broken(thief, room):
        raise RuntimeError("the registry is away")

    site = HeldSite("held")
    dispatcher = ReplicaDispatcher(site, SPEC, max_batch=TASK, max_in_flight=1, borrow=broken)
    first = dispatcher.submit(request("first"))
    site.answer(0)
    assert first.result(timeout=5).completions[0].text == "ok"
    second = dispatcher.submit(request("second"))
    site.answer(1)  # it left: the slot came back
    assert second.result(timeout=5).completions[0].text == "ok"
