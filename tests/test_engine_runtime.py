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


def test_a_submission_cancelled_while_its_replica_is_first_made_still_runs_and_is_charged_once(tmp_path,
                                                                                               demo_model_dir):
    """A route's ``submit_async`` places the request on the event loop; the replica's first dispatcher is
    made in a thread. A caller cancelled meanwhile (it left) must not strand the placed request: it runs
    and is charged once, as one cancelled during a thread-pool submit always was."""
    import asyncio
    import shutil
    import time
    from pathlib import Path

    from tpm_fed.federation import ModelConfig
    from tpm_fed.home import DEMO_MODEL_NAME
    from tpm_fed.identity import LocalUser
    from tpm_fed.protocol.requests import GenerationRequest
    from tpm_fed.service.runtime import Runtime

    home = TpmHome(tmp_path / "home")
    shutil.copytree(demo_model_dir, home.models_dir / DEMO_MODEL_NAME)
    Federation(name="cancelled", sites=[SiteConfig(name="local")],
               models=[ModelConfig(name=DEMO_MODEL_NAME, path=Path("models") / DEMO_MODEL_NAME, backend="torch")],
               projects=[ProjectConfig(name="p", members=[LocalUser().current()], allocations={"local": 1e6})],
               ).dump(home.federation_file)
    with Runtime(home) as runtime:
        request = GenerationRequest.create("The cell", DEMO_MODEL_NAME, max_new_tokens=2)

        making = runtime.pool.dispatcher

        def slowly_made(admission, spec):  # a site that takes a while to start
            time.sleep(0.5)
            return making(admission, spec)

        runtime.pool.dispatcher = slowly_made

        async def leave_midway():
            submitting = asyncio.ensure_future(runtime.submit_async(request))
            await asyncio.sleep(0.1)  # placed; its replica's dispatcher is being made in a thread
            assert runtime._bookkeeper.admission_of(request.request_id) is not None
            submitting.cancel()
            await asyncio.gather(submitting, return_exceptions=True)

        asyncio.run(leave_midway())
        deadline = time.monotonic() + 300  # a cold replica under a loaded machine
        while runtime._bookkeeper.admission_of(request.request_id) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runtime._bookkeeper.admission_of(request.request_id) is None, "placed, never run: stranded"
        charges = [c for c in runtime.ledger.statement("p") if c.request_id == request.request_id]
        assert [c.state for c in charges] == ["settled"]
        (balance,) = runtime.ledger.balances("p")
        assert balance.spent_usu == charges[0].charged_usu > 0 and balance.reserved_usu == 0
