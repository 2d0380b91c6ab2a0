"""The local site runs functions through the real Globus Compute endpoint engine."""

from __future__ import annotations

import pytest

from functions.serve import echo, worker_info
from tests.helpers import raise_value_error, worker_pid
from tpm_fed.protocol.errors import RemoteExecutionError, SiteError
from tpm_fed.federation import SiteConfig, WorkerSettings
from tpm_fed.sites.local import LocalSite


def test_round_trip_through_the_engine(runtime):
    site = runtime.site("local")
    payload = {"nested": [1, 2.5, "three"], "none": None, "text": "\x00\xff"}
    assert site.submit(echo, payload).result(timeout=60) == payload  # results travel as JSON data
    info = site.submit(worker_info).result(timeout=60)
    assert info["pid"] == site.submit(worker_pid).result(timeout=60)
    assert site.status().state == "running"


def test_remote_exception_carries_the_remote_message_and_the_site_survives(runtime):
    site = runtime.site("local")
    with pytest.raises(RemoteExecutionError, match="ValueError: the detector is saturated") as caught:
        site.submit(raise_value_error, "the detector is saturated").result(timeout=60)
    assert "raise_value_error" in caught.value.remote_traceback
    assert site.submit(echo, 7).result(timeout=60) == 7


_FREEZE_PROBE = """
import gc, sys
from pathlib import Path
from tpm_fed.sites import long_lived
from tpm_fed.sites.local import LocalSite
from functions.serve import echo
said = []
if sys.argv[2] == "service":
    long_lived.tune_collector_in_this_process(report=said.append)
site = LocalSite("probe", Path(sys.argv[1]))
try:
    assert site.submit(echo, 1).result(timeout=60) == 1  # started
    walked = gc.get_objects()  # every generation a collection walks (the frozen one is not among them)
    print(gc.get_freeze_count(), any(obj is site._engine for obj in walked), len(said), gc.get_threshold()[0])
finally:
    site.shutdown()
"""


def _freeze_probe(run_dir, role: str) -> list[str]:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, str(run_dir), role], capture_output=True,
                          text=True, timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_in_the_services_process_a_started_sites_objects_are_out_of_the_collectors_full_passes(tmp_path):
    """What a site's start built lives as long as the service: a full collection must not walk it again
    (on this machine each walk took 0.1-0.17 s of the service's CPU, in the middle of a batch)."""
    frozen, engine_walked, reported, _ = _freeze_probe(tmp_path / "service", "service")
    assert int(frozen) > 0 and engine_walked == "False" and reported == "1"


def test_in_the_services_process_the_youngest_generation_is_collected_less_often(tmp_path):
    """At Python's 700 the collector ran 155 times a second under 64 clients and held the GIL for about 8% of
    the service's time, walking objects reference counting was about to free (docs/performance.md)."""
    from tpm_fed.sites.long_lived import YOUNG_THRESHOLD

    *_, young = _freeze_probe(tmp_path / "service", "service")
    assert int(young) == YOUNG_THRESHOLD > 700


def test_elsewhere_a_started_site_leaves_the_collector_as_it_was(tmp_path):
    """A freeze is process-wide: in a user's own process, garbage cycles of objects alive then would stay
    until exit. Only the service's process freezes."""
    frozen, engine_walked, reported, young = _freeze_probe(tmp_path / "user", "user")
    assert frozen == "0" and engine_walked == "True" and reported == "0" and young == "700"


def test_config_round_trip(tmp_path):
    config = SiteConfig(name="here", capacity={"max_replicas": 3},
                        worker=WorkerSettings(allow_caller_code=True, adapter_registry=tmp_path / "adapters"))
    site = LocalSite.from_config(config, run_dir=tmp_path)
    assert LocalSite(**site.config()).config() == site.config()
    assert site.config()["allow_caller_code"] and site.config()["adapter_registry"] == str(tmp_path / "adapters")
    assert site.status().state == "stopped"


def test_a_site_that_cannot_start_says_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    site = LocalSite("broken", run_dir=blocker / "run")
    with pytest.raises(SiteError, match="could not start"):
        site.submit(echo, 1)
    assert site.status().state == "failed"


def test_a_site_left_open_stops_its_workers_when_python_exits(tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = (
        "import sys; from pathlib import Path; from tpm_fed.sites.local import LocalSite; "
        "from tests.helpers import worker_pid; "
        f"site = LocalSite('forgotten', Path({str(tmp_path)!r})); "
        "print(site.submit(worker_pid).result(timeout=60), flush=True)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}"), "the worker outlived the process that started it"
