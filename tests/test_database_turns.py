"""SQLite writers of one process take turns (tpm_fed/state/database.py): a person's request goes first, every
transaction still commits or rolls back as its own, and a connection dropped mid-transaction gives its turn back."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text

from tpm_fed.engine.pending import Pending
from tpm_fed.engine.settlement import Settlement
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.protocol.model import ModelSpec
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.state import database, open_database, writing_first

scratch = MetaData()
order_table = Table("turn_order", scratch, Column("seq", Integer, primary_key=True, autoincrement=True),
                    Column("who", String))


@pytest.fixture
def engine(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'state.db'}")
    scratch.create_all(engine)
    yield engine
    engine.dispose()


def writes_in_order(engine) -> list[str]:
    with engine.connect() as db:
        return [who for (who,) in db.execute(select(order_table.c.who).order_by(order_table.c.seq))]


def test_a_writer_inside_writing_first_goes_ahead_of_those_already_waiting(engine):
    """Three batch writers wait behind a held transaction; a person's writer comes last and still goes first.
    (Without the turns, the four retry on SQLite's sleeping busy handler and the last comes first only by
    chance: this fails in most rounds.)"""
    for round_ in range(3):
        holding, release = threading.Event(), threading.Event()

        def hold():
            with engine.begin() as db:
                db.execute(text("SELECT 1"))
                holding.set()
                release.wait(10)

        def write(who: str, first: bool):
            with writing_first() if first else nullcontext(), engine.begin() as db:
                db.execute(insert(order_table).values(who=who))

        with ThreadPoolExecutor(5) as pool:
            held = pool.submit(hold)
            assert holding.wait(10)
            batch = [pool.submit(write, f"{round_}:batch-{n}", False) for n in range(3)]
            time.sleep(0.2)  # they queue behind the held transaction
            person = pool.submit(write, f"{round_}:person", True)
            time.sleep(0.2)
            release.set()
            for future in [held, *batch, person]:
                future.result(timeout=30)
        written = [who for who in writes_in_order(engine) if who.startswith(f"{round_}:")]
        assert written[0] == f"{round_}:person", written
        assert sorted(written[1:]) == [f"{round_}:batch-{n}" for n in range(3)]


def test_many_writers_each_commit_or_roll_back_as_their_own(engine):
    """Eight threads, 40 transactions each, every fifth one failing: each commits or rolls back alone,
    none is refused for a locked database, and the turns never get stuck."""
    def work(worker: int):
        for n in range(40):
            try:
                with writing_first() if n % 3 == 0 else nullcontext(), engine.begin() as db:
                    db.execute(insert(order_table).values(who=f"{worker}-{n}"))
                    if n % 5 == 4:
                        raise InvalidRequest("rolled back")
            except InvalidRequest:
                pass

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, worker) for worker in range(8)]:
            future.result(timeout=120)
    written = writes_in_order(engine)
    assert sorted(written) == sorted(f"{w}-{n}" for w in range(8) for n in range(40) if n % 5 != 4)


def test_a_connection_dropped_mid_transaction_gives_its_turn_back(engine):
    """A transaction left open and its connection dropped (the pool rolls it back on its own): the next writer
    gets its turn at once, not after the 30 s a turn may wait."""
    other = engine.connect()
    dropped = engine.connect()
    other.close()  # first in the pool's line: the next writer gets this connection, not the dropped one's
    dropped.execute(insert(order_table).values(who="never committed"))  # begins: takes the turn
    del dropped
    gc.collect()  # the pool takes the connection back, rolled back

    done = threading.Event()

    def write():
        with engine.begin() as db:
            db.execute(insert(order_table).values(who="next"))
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "the next writer still waits for the dropped connection's turn"
    assert writes_in_order(engine) == ["next"]


class _Recorder:
    """A settlement recorder that notes, per call, whether it ran inside :func:`writing_first`."""

    def __init__(self):
        self.first: list[bool] = []

    def record_sent(self, site, version, requests):
        self.first.append(getattr(database._FIRST, "on", False))
        return {}

    def record_outcomes(self, outcomes):
        self.first.append(getattr(database._FIRST, "on", False))
        return outcomes


@pytest.mark.parametrize(("background", "first"), [(False, True), (True, False)])
def test_a_person_s_request_reserves_and_settles_first_and_a_batch_line_does_not(background, first):
    recorder = _Recorder()
    settlement = Settlement("local", ModelSpec(name="m", version="v", path="/nowhere"), recorder)
    pending = [Pending(GenerationRequest.create("x", "m", max_new_tokens=1), Future(), background=background)]
    settlement.reserve(pending)
    settlement.settle(pending, [InvalidRequest("answered")])
    assert recorder.first == [first, first]


def test_a_writer_that_may_not_wait_is_refused_at_once_while_another_writes(engine, tmp_path):
    """``writing_now()`` (a reservation made on the event loop): while another writer of this process holds the
    database, or another process (a ``tpm`` command on the same file) holds SQLite's own lock, a transaction
    raises WriterBusy at once and writes nothing; free, it writes; either way the lock is free for the next.
    (Without it, the first waits for its turn and the second for SQLite's 30 s busy timeout.)"""
    import sqlite3

    holding, release = threading.Event(), threading.Event()

    def hold():
        with engine.begin() as db:
            db.execute(insert(order_table).values(who="holder"))
            holding.set()
            release.wait(10)

    def write_now(who: str) -> float:
        started = time.monotonic()
        with database.writing_now(), engine.begin() as db:
            db.execute(insert(order_table).values(who=who))
        return time.monotonic() - started

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(hold)
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(database.WriterBusy):
            write_now("while this process writes")
        assert time.monotonic() - started < 1.0
        release.set()
        held.result(10)
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(database.WriterBusy):
            write_now("while another process writes")
        assert time.monotonic() - started < 1.0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert write_now("free") < 1.0
    with engine.begin() as db:  # the turn was given back each time, and SQLite's busy timeout put back
        db.execute(insert(order_table).values(who="after"))
        assert db.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(database.BUSY_TIMEOUT_S * 1000)
    assert writes_in_order(engine) == ["holder", "free", "after"]
