"""Batch lines are scheduled after interactive requests in the engine: they carry BATCH_PRIORITY.

vLLM's scheduler (``scheduling_policy="priority"``, functions/backends/vllm_backend.py) runs lower
priorities first; every batch line's priority is its own plus BATCH_PRIORITY, so it ranks after
every interactive request, whatever priority either caller chose.
"""

from __future__ import annotations

import pytest

from tests.batch_helpers import batch_home, jsonl
from tests.service_helpers import served
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.requests import BATCH_PRIORITY, CALLER_PRIORITY_BOUND, GenerationRequest


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, demo_model_dir):
    """A runtime whose submitted requests are noted (then served as usual), and its service."""
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(batch_home(tmp_path_factory.mktemp("priority-home"), demo_model_dir)) as assembly:
        runtime = assembly.engine
        seen: list = []
        submit, submit_async = runtime.submit, runtime.submit_async

        def noting(request, *args, **kwargs):  # batch lines are submitted from the runner's thread
            seen.append(request)
            return submit(request, *args, **kwargs)

        async def noting_async(request, *args, **kwargs):  # the routes submit on the event loop
            seen.append(request)
            return await submit_async(request, *args, **kwargs)

        runtime.submit, runtime.submit_async = noting, noting_async
        with served(assembly) as (url, token):
            yield runtime, url, token, seen


def test_batch_lines_run_after_every_interactive_request(recorded, tmp_path):
    from tpm_fed.client import Client

    runtime, url, token, seen = recorded
    bodies = [{"model": DEMO_MODEL_NAME, "prompt": f"The cell {i}", "max_tokens": 4, "temperature": 0,
               **({"priority": -5} if i == 0 else {"priority": 7} if i == 1 else {})} for i in range(3)]
    path = tmp_path / "lines.jsonl"
    path.write_bytes(jsonl([{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}
                            for i, body in enumerate(bodies)]))
    with Client(url, token) as client:
        batch = client.batches.submit(path, project="batches")
        ended = client.batches.wait(batch["id"], poll_s=0.2, timeout_s=300)
        assert ended["status"] == "completed", ended
        interactive = client.generate("The cell", max_new_tokens=2).result()
    by_prompt = {r.prompts[0]: r.priority for r in seen if isinstance(r, GenerationRequest)}
    assert by_prompt["The cell 0"] == BATCH_PRIORITY - 5
    assert by_prompt["The cell 1"] == BATCH_PRIORITY + 7
    assert by_prompt["The cell 2"] == BATCH_PRIORITY
    assert by_prompt["The cell"] == 0 and interactive.texts
    # The most urgent batch line still ranks after the least urgent interactive request.
    assert BATCH_PRIORITY - (CALLER_PRIORITY_BOUND - 1) > CALLER_PRIORITY_BOUND - 1
