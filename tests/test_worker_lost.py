"""The worker holding a replica is killed in the middle of a batch: nothing is lost, nothing charged twice.

The real engine and worker: sixteen requests leave as one batch, the worker
process running it is killed once it is busy with it, the engine reports the
worker lost (within about a second: ``HEARTBEAT_PERIOD_S``), and the runtime
sends the batch again to a new replica on the restarted worker. Every
caller gets the tokens an undisturbed run gives, each request is charged
once, and no reservation is left.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser

PROMPTS = [f"The {word} of the river" for word in
           ("edge", "bend", "mouth", "source", "bank", "bed", "flow", "course",
            "delta", "basin", "floor", "surface", "depth", "width", "length", "name")]
BUSY_TICKS = 10
"""CPU time (1/100 s) the worker spends on the batch before it is killed: it holds the task by then
(an idle worker spends next to none; the batch, about ten times this even on a fast machine)."""


@pytest.fixture
def lone_worker_home(tmp_path, demo_model_dir):
    home = TpmHome(tmp_path / "home")
    home.root.mkdir(parents=True, exist_ok=True)
    Federation(
        name="worker-lost",
        # A long linger: the sixteen requests leave as one batch, however slowly this machine submits them.
        sites=[SiteConfig(name="local", batch_linger_ms=500)],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path(demo_model_dir), backend="torch")],
        projects=[ProjectConfig(name="tests", members=[LocalUser().current()], allocations={"local": 1e6})],
    ).dump(home.federation_file)
    return home


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def run_batch(runtime, prompts):
    futures = [runtime.generate(prompt, max_new_tokens=160, min_new_tokens=160) for prompt in prompts]
    return futures


def test_killing_the_worker_mid_batch_loses_nothing_and_charges_each_request_once(lone_worker_home):
    from tpm_fed.service.runtime import Runtime

    with Runtime(lone_worker_home) as runtime:
        site = runtime.site("local")
        undisturbed = [f.result(timeout=600) for f in run_batch(runtime, PROMPTS)]
        assert {r.replica.batch_size for r in undisturbed} == {16}
        worker = undisturbed[0].replica.pid

        sent = []
        real_submit = site.submit
        site.submit = lambda *args, **kwargs: sent.append(args[2]) or real_submit(*args, **kwargs)
        before = cpu_ticks(worker)
        futures = run_batch(runtime, PROMPTS)
        while cpu_ticks(worker) - before < BUSY_TICKS:
            assert not any(f.done() for f in futures), "the batch finished before the worker could be killed"
            time.sleep(0.01)
        resent_after: list[float] = []
        site.submit = lambda *args, **kwargs: (sent.append(args[2]), resent_after.append(time.monotonic()),
                                               real_submit(*args, **kwargs))[-1]
        os.kill(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        results = [f.result(timeout=600) for f in futures]
        print(f"\nworker killed mid-batch: batch sent again {resent_after[0] - killed_at:.1f} s later, "
              f"all 16 answered {time.monotonic() - killed_at:.1f} s later "
              f"(an undisturbed batch ran {undisturbed[0].timings.run_s:.1f} s, its model loaded in "
              f"{undisturbed[0].timings.load_s:.1f} s)")

        assert [len(batch) for batch in sent] == [16, 16]  # the lost batch, then the same sixteen again
        assert len(resent_after) == 1
        assert [r.completions[0].token_ids for r in results] == [r.completions[0].token_ids for r in undisturbed]
        assert all(r.replica.pid != worker and not r.replica.warm for r in results)
        lines = {c.request_id: c for c in runtime.ledger.statement()}
        assert len(lines) == 32 and {c.state for c in lines.values()} == {"settled"}
        assert all(lines[r.request_id].charged_usu == round(r.charge.charged_su * 1e6) > 0 for r in results)
        (balance,) = runtime.ledger.balances()
        assert balance.reserved_usu == 0
        assert balance.spent_usu == sum(c.charged_usu for c in lines.values())
        assert all(runtime.log.status_of(r.request_id) == "done" for r in results)
