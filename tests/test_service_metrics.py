"""``/metrics`` scraped and parsed as Prometheus would; the SLO report against the federation's targets."""

from __future__ import annotations

import math
import tracemalloc
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.service_helpers import ServiceThread
from tpm_fed.federation import SloTarget, Slos
from tpm_fed.protocol.errors import Unauthenticated
from tpm_fed.service.slo import ACCURACY, SLICES, SloTracker, percentile

OPERATOR, USER = "operator-token", "user-token"


@dataclass(frozen=True)
class TokenTable:
    """Two tokens, two identities: the runtime's owner (an operator) and a user."""

    owner: str
    mode: str = "local"

    def known(self, token: str | None) -> str:
        return self.authenticate(token)  # a table lookup: never blocks

    def authenticate(self, token: str | None) -> str:
        identities = {OPERATOR: self.owner, USER: "someone-else"}
        if token not in identities:
            raise Unauthenticated("unknown token")
        return identities[token]


@pytest.fixture(scope="module")
def watched(assembly, runtime):
    from tpm_fed.service.app import build_app

    with ServiceThread(build_app(assembly, TokenTable(runtime.owner), operators=frozenset({runtime.owner}))) as url:
        yield url


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` as (name, sorted labels) -> value, parsed by prometheus_client."""
    answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels))


def complete(url: str, token: str = OPERATOR, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {token}"}, timeout=300,
                      json={"model": "demo-llama", "prompt": "The cell", "max_tokens": 3, "temperature": 0, **body})


def test_counters_move_by_exactly_the_requests_sent(watched):
    complete(watched).raise_for_status()  # warm: a cold start, if any, is not in the figures below
    before = scrape(watched)
    answers = [complete(watched) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers)
    assert complete(watched, model="no-such-model").status_code == 404
    assert complete(watched, max_tokens=-1).status_code == 400
    after = scrape(watched)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tpm_requests_total", kind="generate", model="demo-llama", site="local", outcome="ok") == 3
    assert moved("tpm_request_seconds_count", kind="generate") == 4  # three served, one refused by the runtime
    assert moved("tpm_errors_total", type="UnknownModel") == 1
    assert moved("tpm_errors_total", type="InvalidRequest") == 1
    tokens_out = sum(a.json()["usage"]["completion_tokens"] for a in answers)
    tokens_in = sum(a.json()["usage"]["prompt_tokens"] for a in answers)
    assert moved("tpm_tokens_total", model="demo-llama", direction="out") == tokens_out
    assert moved("tpm_tokens_total", model="demo-llama", direction="in") == tokens_in
    charged = sum(a.json()["tpm"]["charge"]["charged_su"] for a in answers)
    assert moved("tpm_service_units_charged_total", project="tests") == pytest.approx(charged)
    # Replicas as they stand at the scrape: the warm one, with nothing running or waiting.
    assert total(after, "tpm_replicas", site="local", state="warm") >= 1
    assert total(after, "tpm_replica_waiting", site="local", model="demo-llama") == 0


def test_metrics_are_for_operators(watched):
    assert httpx.get(f"{watched}/metrics").status_code == 401
    refused = httpx.get(f"{watched}/metrics", headers={"Authorization": f"Bearer {USER}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "NotPermitted"


def test_the_slo_report_counts_served_requests_against_no_target(watched):
    complete(watched).raise_for_status()
    report = httpx.get(f"{watched}/tpm/v1/slo", headers={"Authorization": f"Bearer {USER}"}).json()
    generate = next(row for row in report["kinds"] if row["kind"] == "generate")
    assert generate["requests"] >= 1 and 0 < generate["p50_s"] <= generate["p95_s"]
    assert generate["target"] is None and generate["met"] is None  # the tests' federation sets none


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slo_percentiles_availability_and_window():
    clock = Clock()
    slos = Slos(window_s=60, generate=SloTarget(p95_latency_s=1.0, availability=0.9))
    tracker = SloTracker(lambda: slos, clock=clock)
    for seconds in [0.1 * i for i in range(1, 21)]:  # 0.1 ... 2.0 s
        tracker.record("generate", seconds, "ok")
    tracker.record("generate", 5.0, "refused")  # the caller's fault: counts neither way
    tracker.record("generate", 5.0, "failed")
    row = next(r for r in tracker.report()["kinds"] if r["kind"] == "generate")
    assert (row["requests"], row["refused"], row["failed"]) == (22, 1, 1)
    assert row["p50_s"] == pytest.approx(1.0, rel=ACCURACY) and row["p95_s"] == pytest.approx(1.9, rel=ACCURACY)
    assert row["availability"] == pytest.approx(20 / 21)
    assert row["met"] == {"latency": False, "availability": True}

    clock.now += 61  # everything above leaves the window
    tracker.record("generate", 0.2, "ok")
    row = next(r for r in tracker.report()["kinds"] if r["kind"] == "generate")
    assert (row["requests"], row["availability"]) == (1, 1.0) and row["p95_s"] == pytest.approx(0.2, rel=ACCURACY)
    assert row["met"] == {"latency": True, "availability": True}
    trace = next(r for r in tracker.report()["kinds"] if r["kind"] == "trace")
    assert trace["requests"] == 0 and trace["p50_s"] is None and trace["met"] is None


def test_a_shortened_slo_window_is_read_over_its_new_length():
    """The operator cuts a 30-day window to a minute: the requests of the last days leave the report at once,
    not when the slice they were kept in (12 hours wide) would have ended."""
    clock = Clock()
    slos = Slos(window_s=30 * 86400)
    tracker = SloTracker(lambda: slos, clock=clock)
    tracker.record("generate", 9.0, "ok")
    clock.now += 3600
    tracker.record("generate", 9.0, "failed")
    slos = Slos(window_s=60)
    clock.now += 5
    row = next(r for r in tracker.report()["kinds"] if r["kind"] == "generate")
    assert row["requests"] == 0 and row["p95_s"] is None
    tracker.record("generate", 0.5, "ok")
    clock.now += 30
    tracker.record("generate", 0.7, "ok")
    row = next(r for r in tracker.report()["kinds"] if r["kind"] == "generate")
    assert (row["requests"], row["failed"]) == (2, 0) and row["p95_s"] == pytest.approx(0.7, rel=ACCURACY)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-4, max_value=1e4), min_size=1, max_size=400),
       st.sampled_from([0.5, 0.95, 0.99, 1.0]))
def test_slo_percentiles_are_the_nearest_rank_within_the_sketch_accuracy(latencies, share):
    clock = Clock()
    slos = Slos(window_s=600)
    tracker = SloTracker(lambda: slos, clock=clock)
    for seconds in latencies:  # spread over several slices, so the report merges them
        tracker.record("generate", seconds, "ok")
        clock.now += 1.0
    exact = sorted(latencies)[max(0, math.ceil(share * len(latencies)) - 1)]
    assert percentile(tracker._merged(tracker._seen["generate"])[1], share) == pytest.approx(exact, rel=ACCURACY)


def test_the_slo_window_holds_bounded_memory_whatever_the_request_rate():
    """An hour's window at 1,000 requests a second is 3.6 M requests: what it keeps must not grow with them."""
    clock = Clock()
    slos = Slos(window_s=3600)
    tracker = SloTracker(lambda: slos, clock=clock)

    def requests(count: int, per_s: float) -> None:
        for index in range(count):
            tracker.record("generate", 0.01 + (index % 997) * 1e-4, "ok" if index % 50 else "failed")
            clock.now += 1 / per_s

    requests(72_000, per_s=10)  # two windows: every slice made, the oldest already gone
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        requests(120_000, per_s=1000)  # two minutes at 100 times the rate
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    row = next(r for r in tracker.report()["kinds"] if r["kind"] == "generate")
    # the last hour (and at most one slice more): 34,800-35,400 at 10 a second, then all 120,000
    assert 154_790 <= row["requests"] <= 155_410 and row["failed"] == pytest.approx(row["requests"] / 50, abs=2)
    assert len(tracker._seen["generate"]) <= SLICES + 1
    assert grown < 100_000, f"the window grew {grown} bytes over 120,000 requests"
