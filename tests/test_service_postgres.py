"""The service on PostgreSQL: two client processes spend one allocation at once, through the service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.identity import LocalUser
from tpm_fed.ledger import Ledger
from tpm_fed.state import open_database

SPENDER = """
import json, sys
from concurrent.futures import wait
from tpm_fed import Client
from tpm_fed.protocol.errors import InsufficientBalance

url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client(url, token) as client:
    futures = [client.generate("The cell divides", max_new_tokens=16) for _ in range(count)]
    wait(futures)
served, refused = [], 0
for future in futures:
    error = future.exception()
    if error is None:
        result = future.result()
        served.append([result.request_id, result.charge.charged_su])
    elif isinstance(error, InsufficientBalance):
        refused += 1
    else:
        raise error
print(json.dumps({"served": served, "refused": refused}))
"""


@pytest.mark.slow
def test_two_processes_spending_one_allocation_neither_overspend_nor_lose_a_charge(
        tmp_path, demo_model_dir, postgres_url):
    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    grant_su = 0.4  # about a dozen of these requests' estimates: the rest must be refused
    Federation(
        name="pg",
        sites=[SiteConfig(name="local")],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="lab", members=[LocalUser().current()], allocations={"local": grant_su})],
    ).dump(home.federation_file)
    engine = open_database(postgres_url)
    with engine.begin() as db:
        for table in ("charges", "allocations", "replicas", "requests"):
            db.exec_driver_sql(f"DELETE FROM {table}")
    service = subprocess.Popen([sys.executable, "-m", "tpm_fed.service", "--home", str(home.root),
                                "--database-url", postgres_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = _wait_for_service(home, service)
        spenders = [subprocess.Popen([sys.executable, "-c", SPENDER, info["url"], info["token"], "20"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outcomes = []
        for spender in spenders:
            out, err = spender.communicate(timeout=300)
            assert spender.returncode == 0, err
            outcomes.append(json.loads(out))
    finally:
        service.terminate()
        service.wait(timeout=60)
    served = [item for outcome in outcomes for item in outcome["served"]]
    refused = sum(outcome["refused"] for outcome in outcomes)
    assert served and refused and len(served) + refused == 40
    ledger = Ledger(engine)
    (balance,) = ledger.balances("lab")
    charges = {c.request_id: c for c in ledger.statement("lab")}
    settled = {rid: c for rid, c in charges.items() if c.state == "settled"}
    assert balance.reserved_usu == 0 and all(c.state != "reserved" for c in charges.values())
    assert balance.spent_usu <= balance.granted_usu
    assert balance.spent_usu == sum(c.charged_usu for c in settled.values())
    assert sorted(settled) == sorted(rid for rid, _ in served)  # every answer charged once, no other charge
    for request_id, charged_su in served:
        assert settled[request_id].charged_usu == round(charged_su * 1e6)


def _wait_for_service(home: TpmHome, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the service exited: {process.stdout.read().decode()}")
        path = home.root / "service.json"
        if path.exists():
            info = json.loads(path.read_text())
            if info["pid"] == process.pid:
                return info
        time.sleep(0.1)
    raise AssertionError("the service did not start")


@pytest.mark.slow
def test_a_batch_on_postgresql_runs_every_line_once_and_charges_each_once(tmp_path, demo_model_dir, postgres_url):
    """The batch API's state (files, batches, lines, kept results) on the shared deployment's database."""
    import io

    from tests.batch_helpers import batch_home, jsonl, mixed_lines, read_jsonl, wait_for
    from tests.service_helpers import openai_client, served
    from tests.test_batches_lifecycle import _assert_each_line_charged_once, _lines_and_charges
    from tpm_fed.service.assembly import ServiceAssembly

    engine = open_database(postgres_url)
    with engine.begin() as db:
        for table in ("charges", "allocations", "replicas", "requests"):
            db.exec_driver_sql(f"DELETE FROM {table}")
    engine.dispose()
    home = batch_home(tmp_path / "home", demo_model_dir, max_batch_requests=8)
    with ServiceAssembly(home, database_url=postgres_url) as assembly, served(assembly) as (url, token):
        runtime = assembly.engine
        client = openai_client(url, token)
        lines = mixed_lines(24, routes=("/v1/completions", "/v1/chat/completions"), tokens=8)
        file_id = client.files.create(file=("pg.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
        ended = wait_for(client, client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                       completion_window="24h").id)
        assert ended.status == "completed" and ended.request_counts.completed == 24
        output = read_jsonl(client.files.content(ended.output_file_id).content)
        assert [line["custom_id"] for line in output] == [line["custom_id"] for line in lines]  # input order
        rows, charges = _lines_and_charges(postgres_url, ended.id)
        total = _assert_each_line_charged_once(rows, charges)
        (balance,) = runtime.ledger.balances("batches")
        assert (balance.spent_usu, balance.reserved_usu) == (total, 0) and total > 0
