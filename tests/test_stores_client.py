"""Vector stores from Python (``Client.stores``, ``Client.ask``), the command line (``tpm stores``, ``tpm ask``)
and a Parsl workflow (``tpm_fed.parsl.search``), against a real service; and ``tpm stores gc``.

Each path is checked against another: the CLI's hits against the Python API's, the Parsl app's against the
same search called directly, a pinned snapshot's hits before and after a change, refused once collected.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from tests.service_helpers import served
from tests.store_helpers import store_home
from tpm_fed.cli import main
from tpm_fed.client import Client
from tpm_fed.protocol.errors import NotPermitted

NOTES = "The Quorvath beacon on Tessaly moon hums at 7341 hertz. Its keeper is named Oduya."
MORE = "Glaciers move a few metres each day in summer. The ice cracks at the edges as it moves."


@pytest.fixture(scope="module")
def service(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(store_home(tmp_path_factory.mktemp("store-client"), demo_model_dir)) as assembly:
        with served(assembly) as (url, token):
            yield url, token


@pytest.fixture(scope="module")
def client(service):
    with Client(*service) as client:
        yield client


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "beacon.md").write_text(NOTES)
    (folder / "ice.txt").write_text(MORE)
    return folder


def test_the_python_api_makes_searches_pins_and_answers_from_a_store(client, files):
    store = client.stores.create("field-notes", [files / "beacon.md"], chunk_tokens=100, overlap_tokens=0)
    assert store["status"] == "completed" and store["file_counts"]["completed"] == 1
    first = client.stores.search("field-notes", "Who keeps the beacon?")
    assert first["data"][0]["filename"] == "beacon.md" and first["tpm"]["ref"].startswith(store["id"] + "@")
    added = client.stores.add("field-notes", [files / "ice.txt"])
    assert added["file_counts"]["completed"] == 2 and added["tpm"]["snapshot"] != store["tpm"]["snapshot"]
    again = client.stores.search(first["tpm"]["ref"], "Who keeps the beacon?")
    assert again["data"] == first["data"]  # the old snapshot, pinned, has only the first file
    now = client.stores.search("field-notes", "How fast do glaciers move?")
    assert now["data"][0]["filename"] == "ice.txt"

    answer = client.ask("Who keeps the Quorvath beacon?", store="field-notes", max_tokens=6)
    assert answer["citations"][0]["filename"] == "beacon.md" and answer["citations"][0]["chunk"] == 0
    assert NOTES in answer["prompt"] and answer["prompt"].endswith("Question: Who keeps the Quorvath beacon?\nAnswer:")
    assert [s["id"] for s in client.stores.snapshots("field-notes") if s["current"]] == [added["tpm"]["snapshot"]]


def test_the_command_line_makes_lists_searches_and_asks(service, files, client):
    url, token = service
    runner = CliRunner()
    env = {**os.environ, "TPM_URL": url, "TPM_TOKEN": token}
    made = runner.invoke(main, ["stores", "create", "cli-notes", str(files / "beacon.md"), "--chunk-tokens", "100",
                                "--overlap-tokens", "0"], env=env)
    assert made.exit_code == 0, made.output
    assert "1 files ingested, 0 failed" in made.output
    listed = runner.invoke(main, ["stores", "list"], env=env)
    assert "cli-notes" in listed.output
    searched = runner.invoke(main, ["stores", "search", "cli-notes", "Who keeps the beacon?", "--json"], env=env)
    import json

    page = json.loads(searched.output)
    assert page["data"] == client.stores.search("cli-notes", "Who keeps the beacon?", max_results=5)["data"]
    asked = runner.invoke(main, ["ask", "--store", "cli-notes", "--max-tokens", "4", "Who keeps the beacon?"], env=env)
    assert asked.exit_code == 0, asked.output
    assert "beacon.md" in asked.output and "chunk 0" in asked.output
    snapshots = runner.invoke(main, ["stores", "snapshots", "cli-notes"], env=env)
    assert page["tpm"]["snapshot"] in snapshots.output
    removed = runner.invoke(main, ["stores", "rm", "cli-notes"], env=env)
    assert removed.exit_code == 0 and "cli-notes" not in runner.invoke(main, ["stores", "list"], env=env).output


def test_a_parsl_workflow_searches_a_store(client, files):
    import parsl
    from parsl.config import Config

    from tpm_fed import parsl as tpm_parsl

    client.stores.create("workflow-notes", [files / "ice.txt"])
    tpm_parsl.use_client(client)
    try:
        with parsl.load(Config(executors=[tpm_parsl.tpm_executor()])):
            found = tpm_parsl.search("workflow-notes", "glacier speed", max_results=3).result(timeout=120)
    finally:
        tpm_parsl.use_client(None)
    assert found["data"] == client.stores.search(found["tpm"]["ref"], "glacier speed", max_results=3)["data"]


def test_gc_collects_old_snapshots_and_a_collected_pin_is_refused(client, files):
    store = client.stores.create("to-collect", [files / "beacon.md"])
    old = client.stores.search("to-collect", "beacon")["tpm"]["ref"]
    client.stores.add("to-collect", [files / "ice.txt"])
    collected = client.stores.gc()["collected"]
    assert old in collected
    with pytest.raises(NotPermitted):
        client.stores.search(old, "beacon")
    assert client.stores.search("to-collect", "beacon")["data"]  # the current snapshot is kept
    assert client.stores.get(store["id"])["status"] == "completed"


def test_files_queued_when_a_service_stops_are_ingested_by_the_next(tmp_path, demo_model_dir, monkeypatch, files):
    """Nothing is lost across a restart: a file attached but not yet ingested is ingested by the next service
    on the same home (the first one's ingestion thread is kept from starting, so the file is surely queued)."""
    from tpm_fed.service.assembly import ServiceAssembly
    from tpm_fed.stores.ingestion import Ingestion

    home = store_home(tmp_path / "home", demo_model_dir)
    with monkeypatch.context() as patched:
        patched.setattr(Ingestion, "start", lambda self: self)
        with ServiceAssembly(home) as first_assembly, served(first_assembly) as service, Client(*service) as client:
            queued = client.stores.create("restarted", [files / "beacon.md"], wait=False)
            assert queued["status"] == "in_progress" and queued["tpm"]["snapshot"] is None
    with ServiceAssembly(home) as second_assembly, served(second_assembly) as service, Client(*service) as client:
        done = client.stores.wait(queued["id"], timeout_s=300)
        assert done["status"] == "completed" and done["file_counts"]["completed"] == 1 and done["tpm"]["snapshot"]
        assert client.stores.search(queued["id"], "Who keeps the beacon?")["data"][0]["filename"] == "beacon.md"
