"""The broker when sites fail: a site it cannot ask about is out for the request, a lost request is placed again."""

from __future__ import annotations

import pytest

from tests.test_broker import SU, ask, federation
from tpm_fed.broker import Broker, ReplicaRegistry, SiteHealth
from tpm_fed.ledger import Ledger, Metered
from tpm_fed.protocol.errors import NotLoggedIn
from tpm_fed.state import open_database


@pytest.fixture
def broker(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'tpm.db'}")
    return Broker(federation(), Ledger(engine), ReplicaRegistry(engine), SiteHealth(probe_after_s=60))


def not_logged_in() -> str | None:
    raise NotLoggedIn("Globus Compute needs credentials: run `tpm login`")


def test_a_site_that_needs_a_login_is_out_for_the_request_with_why_and_the_others_still_serve(broker):
    broker.health.watch("near", not_logged_in)
    admission = broker.admit("r1", ask(project="astro", identity="ana"))
    assert admission.site != "near"
    (near,) = [c for c in admission.decision.candidates if c.site == "near"]
    assert "NotLoggedIn" in near.excluded and "tpm login" in admission.decision.explain()


def test_a_request_pinned_to_a_site_that_needs_a_login_is_refused_with_why(broker):
    # The login is all that keeps the request out, so the refusal says what to do and why.
    broker.health.watch("near", not_logged_in)
    with pytest.raises(NotLoggedIn, match=r"(?s)tpm login.*near: .*NotLoggedIn"):
        broker.admit("r1", ask(project="astro", identity="ana", site="near"))
    assert broker.ledger.statement() == []


def test_a_lost_request_goes_to_a_new_replica_on_its_site_keeping_its_reservation(broker):
    first = broker.admit("r1", ask(project="astro", identity="ana", location="berkeley"))
    assert first.site == "far" and not first.free
    broker.replica_lost(first.replica_id, 1)
    again = broker.replace_lost(first)
    assert again.site == first.site and again.reserved and again.estimate_usu == first.estimate_usu
    assert broker.registry.get(first.replica_id).state == "starting"  # the slot's new replica
    assert again.cold
    (charge,) = broker.ledger.statement()
    assert (charge.state, charge.site, charge.estimate_usu) == ("reserved", first.site, first.estimate_usu)
    reserved = {b.site: b.reserved_usu for b in broker.ledger.balances("astro")}
    assert reserved[first.site] == first.estimate_usu


def test_a_lost_request_moves_its_reservation_to_another_site_when_its_own_is_out(broker):
    first = broker.admit("r1", ask(project="astro", identity="ana", location="berkeley"))
    assert first.site == "far"
    broker.health.failed("far")
    broker.health.failed("lab")
    broker.replica_lost(first.replica_id, 1)
    again = broker.replace_lost(first)
    assert again.site == "near" and again.estimate_usu == first.estimate_usu
    (charge,) = broker.ledger.statement()
    assert (charge.state, charge.site) == ("reserved", "near")
    reserved = {b.site: b.reserved_usu for b in broker.ledger.balances("astro")}
    assert reserved == {"near": first.estimate_usu, "far": 0}
    assert broker.ledger.settle("r1", Metered(), SU) == first.estimate_usu
    balances = {b.site: (b.spent_usu, b.reserved_usu) for b in broker.ledger.balances("astro")}
    assert balances == {"near": (first.estimate_usu, 0), "far": (0, 0)}
