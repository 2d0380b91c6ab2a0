"""A service that stopped mid-request: the next one to open the ledger settles or releases what it held.

The predecessor is simulated exactly where it matters: rows in the
database held by a process of this machine that no longer exists (its
reservations, its request log rows, its replicas). Opening a runtime on
that database reconciles them once: a request the log says was done is
charged from what it used, one with no outcome is released, the replicas
are marked stopped, and a second opening changes nothing.
"""

from __future__ import annotations

import socket
import time

from sqlalchemy import update

from tpm_fed.broker import ReplicaRegistry
from tpm_fed.ledger import Hold, Ledger, Metered, price_usu
from tpm_fed.protocol.requests import GenerationRequest
from tpm_fed.state import RequestLog, open_database
from tpm_fed.state.schema import requests_table

GONE = f"{socket.gethostname()}:999999999"


def hold(request_id: str, **extra) -> Hold:
    return Hold(request_id, "tests", "local", "someone", "demo", "v", "generate", 50_000, **extra)


def test_a_restart_settles_what_was_done_releases_the_rest_and_stops_the_old_replicas(home, tmp_path):
    from tpm_fed.service.runtime import Runtime

    url = f"sqlite:///{tmp_path / 'restart.db'}"
    engine = open_database(url)
    before = Ledger(engine, holder=GONE)
    before.sync_grants({("tests", "local"): 10.0})
    done, in_flight = GenerationRequest.create("done", "demo"), GenerationRequest.create("running", "demo")
    before.reserve_many([hold(done.request_id), hold(in_flight.request_id)])
    RequestLog(engine).record_sent("local", "v", [done, in_flight])
    with engine.begin() as db:  # the work of one was done and logged; its settlement never happened
        db.execute(update(requests_table).where(requests_table.c.request_id == done.request_id)
                   .values(status="done", prompt_tokens=3, completion_tokens=5, activation_bytes=0, cold_start=False))
    replica = ReplicaRegistry(engine, holder=GONE).start("local", "demo", "v", "torch")
    assert {c.request_id for c in Ledger(engine).in_doubt()} == {done.request_id, in_flight.request_id}

    with Runtime(home, database_url=url) as runtime:
        lines = {c.request_id: c for c in runtime.ledger.statement()}
        expected = price_usu(runtime.federation.prices.generate, Metered(3, 5))
        assert (lines[done.request_id].state, lines[done.request_id].charged_usu) == ("settled", expected)
        assert lines[in_flight.request_id].state == "released"
        assert "no outcome was recorded" in lines[in_flight.request_id].note
        assert runtime.broker.registry.get(replica.replica_id) is None  # stopped, not served from
        (balance,) = [b for b in runtime.ledger.balances() if b.site == "local"]
        assert (balance.spent_usu, balance.reserved_usu) == (expected, 0)
        assert not any(row["in_doubt"] for row in runtime.statement("tests"))

    with Runtime(home, database_url=url) as again:  # reconciled once: nothing moves a second time
        (balance,) = [b for b in again.ledger.balances() if b.site == "local"]
        assert (balance.spent_usu, balance.reserved_usu) == (expected, 0)
        assert [c.state for c in again.ledger.statement()] == [lines[c.request_id].state
                                                               for c in again.ledger.statement()]


def test_the_statement_shows_a_reservation_in_doubt_until_the_sweeper_takes_it(home, tmp_path):
    from tpm_fed.service.runtime import Runtime

    with Runtime(home, database_url=f"sqlite:///{tmp_path / 'doubt.db'}") as runtime:
        stale = GenerationRequest.create("stale", "demo")
        runtime.ledger.reserve_many([hold(stale.request_id, deadline=time.time() - 1)])
        (row,) = runtime.statement("tests")
        assert (row["state"], row["in_doubt"]) == ("reserved", True)
        swept = runtime.sweeper.sweep()
        assert swept.released == [stale.request_id]
        (row,) = runtime.statement("tests")
        assert (row["state"], row["in_doubt"]) == ("released", False)
        assert all(b.reserved_usu == 0 for b in runtime.ledger.balances())
