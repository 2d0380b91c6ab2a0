"""A rank of a split replica killed mid-batch, through the service's runtime: every request is answered once
(run again on a fresh replica), charged once, and no process of the dead replica remains."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.test_multinode_serving import rank_processes, split_home
from tpm_fed.protocol.requests import GenerationRequest

PROMPTS = ["The cell divides", "A river carries the", "The telescope observed the", "Stars"]
BUSY_TICKS = 10
"""CPU time (1/100 s) the rank spends on the batch before it is killed: it is mid-request by then."""


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_rank_killed_mid_batch_is_answered_once_charged_once_and_leaves_nothing_running(tmp_path, demo_model_dir):
    from tpm_fed.service.runtime import Runtime

    with Runtime(split_home(tmp_path / "home", demo_model_dir, nodes_per_block=2)) as runtime:
        ask = lambda: [runtime.submit(GenerationRequest.create([p], "split", max_new_tokens=160,  # noqa: E731
                                                              min_new_tokens=160)) for p in PROMPTS]
        undisturbed = [f.result(600) for f in ask()]
        worker = undisturbed[0].replica.pid
        (rank,) = [pid for pid, parent in rank_processes().items() if parent == worker]

        before = cpu_ticks(rank)
        futures = ask()
        while cpu_ticks(rank) - before < BUSY_TICKS:
            assert not any(f.done() for f in futures), "the batch finished before the rank could be killed"
            time.sleep(0.01)
        os.kill(rank, signal.SIGKILL)
        results = [f.result(600) for f in futures]
        ranks_after = [pid for pid, parent in rank_processes().items() if parent == worker]

        assert [r.token_ids for r in results] == [r.token_ids for r in undisturbed]
        assert all(not r.replica.warm for r in results)  # answered by a fresh replica
        assert rank not in rank_processes() and len(ranks_after) == 1  # the new replica's rank only
        lines = {c.request_id: c for c in runtime.ledger.statement()}
        assert len(lines) == 2 * len(PROMPTS) and {c.state for c in lines.values()} == {"settled"}
        assert all(lines[r.request_id].charged_usu == round(r.charge.charged_su * 1e6) > 0 for r in results)
        (balance,) = runtime.ledger.balances()
        assert balance.reserved_usu == 0
    assert not set(rank_processes()) & set(ranks_after)
