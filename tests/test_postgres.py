"""The ledger and broker on a real PostgreSQL server, started by this test.

Skipped, with the reason, where the server binaries (Debian's postgresql
package: initdb, pg_ctl) or the psycopg driver are missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")

from tpm_fed.protocol.errors import InsufficientBalance  # noqa: E402
from tpm_fed.ledger import Ledger, Metered  # noqa: E402
from tpm_fed.state import open_database  # noqa: E402

SU = 1_000_000


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb refuses to run as root; Debian's package creates the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: cannot start PostgreSQL as a non-root user")
    # Not under pytest's temp root: that is private to the user running the tests.
    folder = Path(tempfile.mkdtemp(prefix="tpm-postgres-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(_as_postgres_user([initdb, "-D", str(data), "-U", "postgres", "--auth=trust"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                      f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres_user([pg_ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ledger(postgres_url):
    engine = open_database(postgres_url)
    with engine.begin() as db:
        for table in ("charges", "allocations", "replicas", "requests"):
            db.exec_driver_sql(f"DELETE FROM {table}")
    ledger = Ledger(engine)
    ledger.sync_grants({("p", "s"): 10.0})
    return ledger


def test_reserve_settle_release_on_postgres(ledger):
    ledger.reserve("a", project="p", site="s", identity="u", model="m", version="v", kind="generate",
                   estimate_usu=3 * SU)
    assert ledger.settle("a", Metered(prompt_tokens=3), SU) == SU
    assert ledger.settle("a", Metered(prompt_tokens=3), SU) == 0
    ledger.reserve("b", project="p", site="s", identity="u", model="m", version="v", kind="generate",
                   estimate_usu=SU)
    assert ledger.release("b", "failed")
    (balance,) = ledger.balances()
    assert (balance.spent_usu, balance.reserved_usu, balance.available_usu) == (SU, 0, 9 * SU)


def test_eight_threads_cannot_overspend_on_postgres(ledger):
    def attempt(index: int) -> int:
        try:
            ledger.reserve(f"t{index}", project="p", site="s", identity="u", model="m", version="v",
                           kind="generate", estimate_usu=SU // 2)
        except InsufficientBalance:
            return 0
        return ledger.settle(f"t{index}", Metered(), SU // 2) + ledger.settle(f"t{index}", Metered(), SU // 2)

    with ThreadPoolExecutor(8) as pool:
        charged = sum(pool.map(attempt, range(60)))
    (balance,) = ledger.balances()
    assert charged == balance.spent_usu == 10 * SU  # exactly the grant: 20 requests, each charged once
    assert balance.reserved_usu == 0 and balance.available_usu == 0
    assert sum(c.state == "settled" for c in ledger.statement()) == 20


def test_concurrent_releases_and_settles_move_each_reservation_once_on_postgres(ledger):
    """Under READ COMMITTED, a release racing a release or a settle must not free (or charge) twice."""
    ids = [f"race{i}" for i in range(40)]
    for request_id in ids:
        ledger.reserve(request_id, project="p", site="s", identity="u", model="m", version="v",
                       kind="generate", estimate_usu=SU // 10)
    barrier = threading.Barrier(4)

    def contend(worker: int) -> list[tuple[str, int]]:
        moved = []
        for request_id in ids:
            barrier.wait()  # all four act on the same reservation at once
            if worker < 2:
                moved.append((request_id, -1 if ledger.release(request_id, f"raced {worker}") else 0))
            else:
                moved.append((request_id, ledger.settle(request_id, Metered(prompt_tokens=1), SU // 20)))
        return moved

    with ThreadPoolExecutor(4) as pool:
        moves = [move for worker in pool.map(contend, range(4)) for move in worker]
    _check_each_moved_once(ledger, ids, moves)


def test_concurrent_batches_settle_and_release_each_reservation_once_on_postgres(ledger):
    ids = [f"batch{i}" for i in range(30)]
    for request_id in ids:
        ledger.reserve(request_id, project="p", site="s", identity="u", model="m", version="v",
                       kind="generate", estimate_usu=SU // 10)
    barrier = threading.Barrier(4)

    def contend(worker: int) -> list[tuple[str, int]]:
        barrier.wait()
        if worker % 2:
            return [(rid, -1 if ok else 0) for rid, ok in ledger.release_many([(rid, "raced") for rid in ids]).items()]
        return list(ledger.settle_many([(rid, Metered(), SU // 20) for rid in ids]).items())

    with ThreadPoolExecutor(4) as pool:
        moves = [move for worker in pool.map(contend, range(4)) for move in worker]
    _check_each_moved_once(ledger, ids, moves)


def _check_each_moved_once(ledger, ids, moves) -> None:
    """Each reservation was released (-1) or charged (> 0) by exactly one caller, and the money agrees."""
    for request_id in ids:
        effective = [m for rid, m in moves if rid == request_id and m != 0]
        assert len(effective) == 1, (request_id, effective)
    lines = {c.request_id: c for c in ledger.statement()}
    settled = [rid for rid in ids if lines[rid].state == "settled"]
    released = [rid for rid in ids if lines[rid].state == "released"]
    assert len(settled) + len(released) == len(ids)
    assert sorted(settled) == sorted(rid for rid, m in moves if m > 0)
    (balance,) = ledger.balances()
    assert balance.reserved_usu == 0
    assert balance.spent_usu == sum(lines[rid].charged_usu for rid in settled) == len(settled) * (SU // 20)
    assert balance.available_usu == 10 * SU - balance.spent_usu


def _workers(args_list, cwd_root):
    import sys

    worker = Path(__file__).with_name("ledger_worker.py")
    env = {"PYTHONPATH": cwd_root, "PATH": os.environ.get("PATH", "")}
    return [subprocess.Popen([sys.executable, str(worker), *args], stdout=subprocess.PIPE, text=True,
                             cwd=cwd_root, env=env) for args in args_list]


def test_several_processes_settling_and_releasing_the_same_reservations_move_each_once_on_postgres(
        ledger, postgres_url, tmp_path):
    ids = [f"proc-race{i}" for i in range(60)]
    for request_id in ids:
        ledger.reserve(request_id, project="p", site="s", identity="u", model="m", version="v",
                       kind="generate", estimate_usu=SU // 10)
    ids_file, go = tmp_path / "ids", tmp_path / "go"
    ids_file.write_text("\n".join(ids))
    root = str(Path(__file__).parent.parent)
    modes = ["settle", "release", "settle", "release"]
    processes = _workers([["race", postgres_url, mode, str(ids_file), str(go)] for mode in modes], root)
    go.touch()
    moves = []
    for process in processes:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0
        moves += [(rid, int(moved)) for rid, moved in (line.split() for line in out.splitlines())]
    assert len(moves) == 4 * len(ids)
    _check_each_moved_once(ledger, ids, moves)


def test_several_processes_reserving_against_one_allocation_cannot_overspend_on_postgres(ledger, postgres_url):
    ledger.sync_grants({("p", "s"): 3.0})
    root = str(Path(__file__).parent.parent)
    processes = _workers([[postgres_url, f"proc{n}", "20", str(SU // 4), str(SU // 10)] for n in range(4)], root)
    counts = []
    for process in processes:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0
        counts.append(tuple(map(int, out.split())))
    settled = [c for c in ledger.statement() if c.state == "settled"]
    assert sum(s for s, _ in counts) == len(settled) and sum(r for _, r in counts) > 0  # some were refused
    (balance,) = ledger.balances()
    assert balance.spent_usu == len(settled) * (SU // 10) == sum(c.charged_usu for c in settled)
    assert balance.reserved_usu == 0 and balance.available_usu >= 0


def test_a_writer_that_may_not_wait_does_not_write_on_postgres(ledger):
    """``writing_now()`` (a reservation made on the event loop) never writes on PostgreSQL, where a row lock may
    wait for another transaction: it raises WriterBusy at once and nothing is reserved (the route's hand-over
    leaves the request to the task's take, off the loop). Outside it, the same reservation goes through."""
    from tpm_fed.state import WriterBusy, refuse_waiting_writer, writing_now

    with pytest.raises(WriterBusy), writing_now():
        ledger.reserve("now", project="p", site="s", identity="u", model="m", version="v", kind="generate",
                       estimate_usu=SU)
    with pytest.raises(WriterBusy), writing_now():  # the bookkeeper asks first, before a connection is checked out
        refuse_waiting_writer(ledger.engine)
    refuse_waiting_writer(ledger.engine)  # outside writing_now(), nothing to refuse
    (balance,) = ledger.balances()
    assert balance.reserved_usu == 0
    ledger.reserve("now", project="p", site="s", identity="u", model="m", version="v", kind="generate",
                   estimate_usu=SU)
    (balance,) = ledger.balances()
    assert balance.reserved_usu == SU
