"""A waiting request's place in its queue and estimated start, through the service and ``tpm status``.

The runtime is the real one (catalog, broker, ledger, dispatchers) over a
site whose tasks end only when the test says (tests/test_retry.HeldSite),
with one request per batch, so a queue forms and drains step by step.
"""

from __future__ import annotations

from click.testing import CliRunner

from tests.homes import demo_home
from tests.service_helpers import ServiceThread
from tests.test_retry import HeldSite
from tpm_fed.federation import SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.protocol.requests import GenerationRequest


def test_queue_position_decreases_as_requests_ahead_finish(tmp_path, demo_model_dir, monkeypatch):
    from tpm_fed.cli import main
    from tpm_fed.client import Client
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken
    from tpm_fed.service.assembly import ServiceAssembly

    home = demo_home(tmp_path / "home", demo_model_dir, site=SiteConfig(name="local", max_batch_requests=1),
                     project="queue")
    with ServiceAssembly(home) as assembly:
        runtime = assembly.engine
        site = HeldSite()
        runtime.pool.sites["local"] = site
        token = "queue-token"
        with ServiceThread(build_app(assembly, LocalToken(token, runtime.owner))) as url, \
                Client(url=url, token=token) as client:
            requests = [GenerationRequest.create(f"prompt {i}", DEMO_MODEL_NAME, max_new_tokens=1) for i in range(4)]
            futures = [runtime.submit(r) for r in requests]
            site.task(0)
            ids = [r.request_id for r in requests]
            running, *waiting = ids  # the first left in task 0; one request per batch

            def places() -> list[int]:
                records = [client.request(i) for i in waiting]
                assert all(r["status"] == "waiting" for r in records), records
                return [r["queue_position"] for r in records]

            assert client.request(running)["status"] != "waiting"
            assert places() == [1, 2, 3]
            starts = [client.request(i)["estimated_start_s"] for i in waiting]
            assert 0 < starts[0] < starts[1] < starts[2]  # later places start later

            monkeypatch.setenv("TPM_URL", url)
            monkeypatch.setenv("TPM_TOKEN", token)
            shown = CliRunner().invoke(main, ["status", waiting[2]], catch_exceptions=False)
            assert shown.exit_code == 0 and "place 3 in its queue" in shown.output

            site.answer(0)
            site.task(1)  # the next request leaves
            waiting = waiting[1:]
            assert places() == [1, 2]
            site.answer(1)
            site.task(2)
            waiting = waiting[1:]
            assert places() == [1]
            for index in (2, 3):
                site.answer(index)
            assert all(f.result(timeout=30).texts == ["ok"] for f in futures)
            assert CliRunner().invoke(main, ["status", ids[3]]).output.startswith(f"{ids[3]}: done")
