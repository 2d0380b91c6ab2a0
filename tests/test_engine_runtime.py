"""The engine as a whole: its interface, its edge checks' table, and a constructor that starts nothing."""

from __future__ import annotations

import threading

from tpm_fed.engine.edge_checks import EDGE_CHECKS
from tpm_fed.engine.engine import Engine
from tpm_fed.engine.interface import EngineClient
from tpm_fed.federation import Federation, ProjectConfig, SiteConfig
from tpm_fed.home import TpmHome
from tpm_fed.protocol.kinds import KINDS
from tpm_fed.service.callers import LocalCallers


def test_the_edge_checks_table_names_exactly_the_kinds_of_the_kinds_table():
    assert set(EDGE_CHECKS) == set(KINDS)


def test_the_runtime_the_service_serves_is_an_engine_client(runtime):
    assert isinstance(runtime, EngineClient)


def test_an_engine_starts_no_thread_and_writes_nothing_until_started(tmp_path):
    home = TpmHome(tmp_path / "home")
    Federation(name="quiet", sites=[SiteConfig(name="local")],
               projects=[ProjectConfig(name="p", members=["ana"], allocations={"local": 10})]).dump(home.federation_file)
    before_files = sorted(p for p in home.root.rglob("*"))
    before_threads = {t.ident for t in threading.enumerate()}

    engine = Engine(home, owner="ana", callers=LocalCallers())
    assert {t.ident for t in threading.enumerate()} == before_threads
    assert sorted(p for p in home.root.rglob("*")) == before_files
    with engine.start():
        assert any(t.name == "tpm-sweeper" for t in threading.enumerate())
        assert engine.projects_of("ana") == ["p"] and engine.status()[0].state == "stopped"
    assert sorted(p for p in home.root.rglob("*")) != before_files  # start() opened the ledger


def test_no_parameter_takes_the_engine_untyped():
    """Whatever is handed the engine names its interface (``EngineClient``), not ``Any``."""
    import ast
    from pathlib import Path

    import tpm_fed

    untyped = []
    for path in Path(tpm_fed.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    if arg.arg in ("runtime", "engine") and (arg.annotation is None
                                                           or "Any" in ast.unparse(arg.annotation)):
                        untyped.append(f"{path.name}:{node.lineno} {node.name}({arg.arg})")
    assert untyped == []
