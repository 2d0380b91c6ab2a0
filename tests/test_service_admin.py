"""The operator routes (``/tpm/v1/admin``) over real HTTP on loopback, against a running runtime.

One service for the module, with three identities: an operator, a user who
becomes a project member while the service runs, and a user who never is
anything. Every change is checked where it lands: the service's answer, the
federation file, the runtime's federation, the ledger, and the warm replica
(which a change must not restart unless its site changed).
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from tests.service_helpers import ServiceThread
from tpm_fed.client import Client
from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
from tpm_fed.home import DEMO_MODEL_NAME, TpmHome
from tpm_fed.protocol.errors import FederationConfigError, NotPermitted, Unauthenticated

OPERATOR, ANA, EVE = "olga@anl.gov", "ana@uchicago.edu", "eve@example.org"
TOKENS = {"olga-token": OPERATOR, "ana-token": ANA, "eve-token": EVE}
ASK = {"model": DEMO_MODEL_NAME, "prompt": "The cell", "max_tokens": 4, "temperature": 0}


@dataclass(frozen=True)
class TokenTable:
    """One token per identity (the service's authenticator protocol, without Globus in the way)."""

    tokens: dict[str, str]
    mode: str = "table"

    def known(self, token: str | None) -> str:
        return self.authenticate(token)  # a table lookup: never blocks

    def authenticate(self, token: str | None) -> str:
        if token not in self.tokens:
            raise Unauthenticated("no bearer token, or not one of this service's")
        return self.tokens[token]


@dataclass(frozen=True)
class Operated:
    url: str
    runtime: Any
    home: TpmHome

    def call(self, method: str, path: str, token: str | None = "olga-token", **options: Any) -> httpx.Response:
        headers = {**options.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **options)

    def complete(self, token: str, **fields: Any) -> httpx.Response:
        return self.call("POST", "/v1/completions", token, json={**ASK, **fields})

    def snapshot(self) -> tuple[bytes, Any, list]:
        """What must not move when a change is refused: the file, the runtime's federation, the ledger."""
        return (self.home.federation_file.read_bytes(), self.runtime.federation,
                [(b.project, b.site, b.granted_usu, b.spent_usu) for b in self.runtime.ledger.balances()])


@pytest.fixture(scope="module")
def operated(tmp_path_factory, demo_model_dir) -> Operated:
    from tpm_fed.service.app import build_app
    from tpm_fed.service.assembly import ServiceAssembly

    home = TpmHome(tmp_path_factory.mktemp("operated-home"))
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(
        name="operated",
        sites=[SiteConfig(name="local")],
        models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
        projects=[ProjectConfig(name="ops", members=[OPERATOR], allocations={"local": 100.0})],
    ).dump(home.federation_file)
    assembly = ServiceAssembly(home)
    runtime = assembly.engine
    try:
        with ServiceThread(build_app(assembly, TokenTable(TOKENS), operators=frozenset({OPERATOR}))) as url:
            yield Operated(url, runtime, home)
    finally:
        assembly.close()


ADMIN_CALLS = [
    ("GET", "/tpm/v1/admin/projects", None),
    ("POST", "/tpm/v1/admin/projects", {"name": "mine", "members": [EVE], "allocations": {"local": 1e6}}),
    ("DELETE", "/tpm/v1/admin/projects/ops", None),
    ("POST", "/tpm/v1/admin/projects/ops/members", {"identity": EVE}),
    ("DELETE", f"/tpm/v1/admin/projects/ops/members/{OPERATOR}", None),
    ("POST", "/tpm/v1/admin/projects/ops/grants", {"site": "local", "service_units": 1e6}),
    ("GET", "/tpm/v1/admin/sites", None),
    ("POST", "/tpm/v1/admin/sites", {"name": "elsewhere"}),
    ("PUT", "/tpm/v1/admin/sites/local", {"name": "local", "keep_alive_s": 1}),
    ("DELETE", "/tpm/v1/admin/sites/local", None),
    ("GET", "/tpm/v1/admin/models", None),
    ("POST", "/tpm/v1/admin/models", {"name": "other", "store": True}),
    ("POST", f"/tpm/v1/admin/models/{DEMO_MODEL_NAME}/tags", {"tag": "v1"}),
    ("GET", "/tpm/v1/admin/adapters", None),
    ("POST", "/tpm/v1/admin/adapters", {"name": "x", "architecture": {"layers": []}, "weights": ""}),
]


def test_a_non_operator_is_refused_and_nothing_changes(operated):
    before = operated.snapshot()
    for method, path, body in ADMIN_CALLS:
        answer = operated.call(method, path, "eve-token", json=body)
        assert answer.status_code == 403, (method, path, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "permission_error" and error["code"] == "NotPermitted"
        assert f"{EVE!r} is not an operator" in error["message"]
        assert operated.call(method, path, None, json=body).status_code == 401
    assert operated.snapshot() == before
    with Client(operated.url, "ana-token") as client, pytest.raises(NotPermitted):
        client.admin.projects()


def test_a_new_member_spends_at_once_on_the_same_warm_replica(operated):
    first = operated.complete("olga-token")
    assert first.status_code == 200, first.text
    replica = first.json()["tpm"]["replica"]
    engine = operated.runtime.site("local")
    refused = operated.complete("ana-token")
    assert refused.status_code == 403 and "not a member of any project" in refused.json()["error"]["message"]

    with Client(operated.url, "olga-token") as client:
        assert client.admin.add_project("astro")["members"] == []
        assert client.admin.add_member("astro", ANA)["members"] == [ANA]
        assert client.admin.grant("astro", "local", 5)["allocations"] == {"local": 5.0}
        assert client.admin.grant("astro", "local", 2.5)["allocations"] == {"local": 7.5}
        assert {p["name"]: p["members"] for p in client.admin.projects()} == {"ops": [OPERATOR], "astro": [ANA]}

    served = operated.complete("ana-token")
    assert served.status_code == 200, served.text
    about = served.json()["tpm"]
    assert about["replica"] == replica and about["warm"] and about["load_s"] == 0
    assert operated.runtime.site("local") is engine  # the same engine: nothing restarted
    charge = next(c for c in operated.runtime.ledger.statement("astro") if c.request_id == about["request_id"])
    assert charge.identity == ANA and charge.charged_usu > 0
    balances = operated.call("GET", "/tpm/v1/allocations", "ana-token").json()["allocations"]
    assert [(b["project"], b["site"], b["granted_su"]) for b in balances] == [("astro", "local", 7.5)]
    assert balances[0]["spent_su"] == pytest.approx(charge.charged_usu / 1e6)
    # The file is the record: a service started on it later sees the same.
    written = Federation.load(operated.home.federation_file)
    assert written.project("astro") == operated.runtime.federation.project("astro")
    assert "models/" + DEMO_MODEL_NAME in operated.home.federation_file.read_text()  # paths stay relative

    with Client(operated.url, "olga-token") as client:
        assert client.admin.remove_member("astro", ANA)["members"] == []
    gone = operated.complete("ana-token")
    assert gone.status_code == 403


BAD_CHANGES = [
    ("POST", "/tpm/v1/admin/projects/ops/grants", {"site": "moon", "service_units": 5}, "unknown site 'moon'"),
    ("POST", "/tpm/v1/admin/projects/ops/grants", {"site": "local", "service_units": -1e9}, "negative"),
    ("POST", "/tpm/v1/admin/projects/ops/grants", {"site": "local", "service_units": "lots"}, "service_units"),
    ("POST", "/tpm/v1/admin/projects/nope/grants", {"site": "local", "service_units": 1}, "unknown project 'nope'"),
    ("POST", "/tpm/v1/admin/projects", {"name": "ops"}, "duplicate projects names: ops"),
    ("POST", "/tpm/v1/admin/projects", {"name": "x", "colour": "red"}, "colour: unknown parameter"),
    ("POST", "/tpm/v1/admin/projects", {"name": "bad name"}, "name"),
    ("POST", "/tpm/v1/admin/projects", {"name": "x", "allocations": {"moon": 1}}, "unknown site 'moon'"),
    ("POST", "/tpm/v1/admin/projects/ops/members", {}, "identity: Field required"),
    ("DELETE", "/tpm/v1/admin/projects/nope", None, "unknown project 'nope'"),
    ("DELETE", f"/tpm/v1/admin/projects/ops/members/{EVE}", None, "is not a member of project 'ops'"),
    ("POST", "/tpm/v1/admin/sites", {"name": "mylab", "billing": "byo"}, "a byo site needs an owner project"),
    ("POST", "/tpm/v1/admin/sites", {"name": "gc", "access": "globus-compute"}, "needs endpoint_id"),
    ("POST", "/tpm/v1/admin/sites", {"name": "local"}, "duplicate sites names: local"),
    ("POST", "/tpm/v1/admin/sites", {"name": "x", "capacity": {"max_replicas": 0}}, "max_replicas"),
    ("POST", "/tpm/v1/admin/sites", {"name": "far", "location": "mars"}, "no distance between"),
    ("PUT", "/tpm/v1/admin/sites/local", {"name": "other"}, "the body names site 'other'"),
    ("DELETE", "/tpm/v1/admin/sites/local", None, "sites: List should have at least 1 item"),
    ("DELETE", "/tpm/v1/admin/sites/nowhere", None, "unknown site 'nowhere'"),
    ("POST", "/tpm/v1/admin/models", {"name": "both", "path": "x", "store": True}, "either a path or store"),
    ("POST", f"/tpm/v1/admin/models/{DEMO_MODEL_NAME}/tags", {"tag": "v1"}, "not the model store"),
    ("POST", "/tpm/v1/admin/adapters",
     {"name": "pickled", "architecture": {"layers": [{"type": "linear", "in_features": 2, "out_features": 3}]},
      "weights": base64.b64encode(b"\x80\x04pickle").decode()}, "not a safetensors file"),
]


@pytest.mark.parametrize(("method", "path", "body", "says"), BAD_CHANGES, ids=[c[3] for c in BAD_CHANGES])
def test_bad_changes_are_400_and_change_nothing(operated, method, path, body, says):
    before = operated.snapshot()
    answer = operated.call(method, path, json=body)
    assert answer.status_code == 400, answer.text
    assert says in answer.json()["error"]["message"]
    assert operated.snapshot() == before


def test_a_body_that_is_not_json_is_400(operated):
    before = operated.snapshot()
    answer = operated.call("POST", "/tpm/v1/admin/projects", content=b"{name: astro",
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    assert operated.snapshot() == before


def test_the_client_raises_the_typed_error(operated):
    with Client(operated.url, "olga-token") as client, pytest.raises(FederationConfigError, match="unknown site"):
        client.admin.grant("ops", "moon", 1)


def test_a_removed_project_spends_no_more_and_keeps_its_statement(operated):
    with Client(operated.url, "olga-token") as client:
        client.admin.add_project("short-lived", [ANA])
        client.admin.grant("short-lived", "local", 3)
        served = operated.complete("ana-token", project="short-lived")
        assert served.status_code == 200, served.text
        request_id = served.json()["tpm"]["request_id"]
        assert client.admin.remove_project("short-lived") == {"removed": "short-lived"}
        assert "short-lived" not in {p["name"] for p in client.admin.projects()}
    refused = operated.complete("ana-token", project="short-lived")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "NotPermitted"
    [charge] = [c for c in operated.runtime.ledger.statement("short-lived") if c.request_id == request_id]
    assert charge.state == "settled" and charge.charged_usu > 0  # history stays
    [balance] = operated.runtime.ledger.balances("short-lived")
    assert balance.granted_usu == 0 and balance.reserved_usu == 0  # nothing left to spend
    assert "short-lived" not in operated.home.federation_file.read_text()


def test_a_site_added_over_http_is_listed_then_removed(operated):
    engine = operated.runtime.site("local")
    with Client(operated.url, "olga-token") as client:
        added = client.admin.add_site({"name": "spare", "capacity": {"max_replicas": 2}, "keep_alive_s": 60})
        assert added["capacity"]["max_replicas"] == 2
        listed = {s["name"]: s for s in client.sites()["sites"]}
        assert listed["spare"]["state"] == "stopped" and listed["spare"]["max_replicas"] == 2
        assert listed["local"]["state"] == "running"  # untouched by the change
        assert [s["name"] for s in client.admin.sites()] == ["local", "spare"]
        assert client.admin.remove_site("spare") == {"removed": "spare"}
        assert [s["name"] for s in client.sites()["sites"]] == ["local"]
    assert operated.runtime.site("local") is engine
    assert [s.name for s in Federation.load(operated.home.federation_file).sites] == ["local"]


def test_adapters_are_registered_by_upload_and_listed(operated):
    architecture = {"layers": [{"type": "linear", "in_features": 6, "out_features": 128}]}
    weights = save({"0.weight": np.ones((128, 6), np.float32), "0.bias": np.zeros(128, np.float32)})
    with Client(operated.url, "olga-token") as client:
        record = client.admin.register_adapter("spectrum-in", architecture, weights, "spectra to the core")
        assert record["ref"].startswith("spectrum-in@") and record["description"] == "spectra to the core"
        again = client.admin.register_adapter("spectrum-in", architecture, weights)
        assert again["ref"] == record["ref"]  # the same bytes are the same version
        assert [a["ref"] for a in client.admin.adapters()] == [record["ref"]]
    assert operated.runtime.adapters.resolve("spectrum-in").ref == record["ref"]
    wrong = operated.call("POST", "/tpm/v1/admin/adapters", json={
        "name": "wrong", "architecture": {"layers": [{"type": "linear", "in_features": 5, "out_features": 128}]},
        "weights": base64.b64encode(weights).decode()})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "AdapterMismatch"


def test_models_are_listed_and_a_model_added_is_served_at_once(operated):
    with Client(operated.url, "olga-token") as client:
        (listed,) = client.admin.models()
        assert listed["name"] == DEMO_MODEL_NAME and len(listed["version"]) == 16
        client.admin.add_model({"name": "twin", "path": f"models/{DEMO_MODEL_NAME}", "backend": "torch"})
        assert [card["id"] for card in client.models()] == [DEMO_MODEL_NAME, "twin"]
    served = operated.complete("olga-token", model="twin")
    assert served.status_code == 200, served.text


def test_requests_in_flight_while_the_federation_changes_all_finish(operated):
    stop = threading.Event()

    def keep_asking() -> list[int]:
        codes = []
        while not stop.is_set():
            codes.append(operated.complete("olga-token", max_tokens=2).status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        askers = [pool.submit(keep_asking) for _ in range(4)]
        with Client(operated.url, "olga-token") as client:
            for _ in range(5):
                client.admin.grant("ops", "local", 1)
                client.admin.add_member("ops", ANA)
                client.admin.remove_member("ops", ANA)
        stop.set()
        codes = [code for asker in askers for code in asker.result()]
    assert codes and set(codes) == {200}
    assert operated.runtime.federation.project("ops").allocations == {"local": 105.0}


def test_a_changed_site_drains_and_its_replicas_stop(operated):
    assert operated.complete("olga-token").status_code == 200
    registry, engine = operated.runtime.broker.registry, operated.runtime.site("local")
    live = [r.replica_id for r in registry.all() if r.site == "local" and r.live]
    assert live
    with Client(operated.url, "olga-token") as client:
        changed = client.admin.replace_site("local", {"name": "local", "keep_alive_s": 900})
    assert changed["keep_alive_s"] == 900
    assert {registry.get(replica_id).state for replica_id in live} == {"stopped"}
    again = operated.complete("olga-token").json()["tpm"]
    assert not again["warm"] and again["load_s"] > 0  # a fresh engine on the new configuration
    assert operated.runtime.site("local") is not engine
    written = json.dumps(Federation.load(operated.home.federation_file).site("local").model_dump(mode="json"))
    assert '"keep_alive_s": 900.0' in written
