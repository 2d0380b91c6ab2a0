"""Quotes: the most a request would cost and when it would be done, before anything runs."""

from __future__ import annotations

import pytest

from tests.homes import demo_home
from tpm_fed.federation import SiteConfig
from tpm_fed.interventions import LogitLens, Save, TraceRequest
from tpm_fed.protocol.errors import InvalidRequest, NotPermitted, UnknownModel
from tpm_fed.protocol.requests import GenerationRequest


def _books(runtime, project: str = "tests"):
    """Everything a quote must leave alone: balances (spent and reserved) and the statement."""
    return runtime.ledger.balances(project), len(runtime.ledger.statement(project))


@pytest.mark.parametrize("request_for", [
    lambda model: GenerationRequest.create(["The cell", "A star is"], model, max_new_tokens=16),
    lambda model: TraceRequest.create(model, prompts=["The river carries"], max_new_tokens=4,
                                      steps=[Save(point="model.layers.1")], logit_lens=LogitLens(top_k=3)),
], ids=["generate", "trace"])
def test_a_quote_bounds_the_charge_and_reserves_nothing(http_client, runtime, request_for):
    request = request_for(str(runtime.default_model()))
    http_client.submit(request_for(str(runtime.default_model()))).result(120)  # a warm replica to quote
    before = _books(runtime)
    quote = http_client.quote(request)
    assert _books(runtime) == before  # nothing reserved, nothing charged
    assert quote.project == "tests" and quote.kind == request.kind and not quote.cold and not quote.free
    assert 0 < quote.expected_su < quote.max_su  # a cold start is in the bound, not in the placement
    assert quote.estimated_s > 0 and quote.site in quote.explanation

    result = http_client.submit(request).result(120)
    assert (result.site, result.version) == (quote.site, quote.version)
    assert 0 < result.charge.charged_su <= quote.expected_su <= quote.max_su


def test_a_quote_where_a_replica_must_start_counts_the_cold_start(tmp_path, demo_model_dir):
    """A fresh home: the quote names a new replica and its cold start; the charge stays under it."""
    from tpm_fed.home import DEMO_MODEL_NAME
    from tpm_fed.service.runtime import Runtime

    fresh = demo_home(tmp_path / "home", demo_model_dir, site=SiteConfig(name="local", cold_start_s=20.0),
                      project="quotes")
    with Runtime(fresh) as runtime:
        request = GenerationRequest.create("The cell", DEMO_MODEL_NAME, max_new_tokens=8)
        quote = runtime.quote(request)
        assert quote.cold and quote.replica is None
        assert quote.expected_su == quote.max_su > 0
        assert quote.estimated_s >= 20.0  # the site's cold start is in the estimate
        assert runtime.ledger.statement() == [] and runtime.broker.registry.all() == []  # nothing started
        result = runtime.submit(request).result(300)
    assert result.charge.charged_su <= quote.max_su


def test_a_bad_request_is_refused_as_submit_would_and_costs_nothing(http_client, runtime):
    model = str(runtime.default_model())
    before = _books(runtime)
    with pytest.raises(UnknownModel):
        http_client.quote(GenerationRequest.create("x", "no-such-model"))
    with pytest.raises(NotPermitted):
        http_client.quote(GenerationRequest.create("x", model, project="not-mine"))
    with pytest.raises(InvalidRequest, match="location"):
        http_client.quote(GenerationRequest.create("x", model, location="the-moon"))
    assert _books(runtime) == before


def test_a_replicas_step_time_is_fit_by_rows_and_times_a_batch_in_waves():
    from tpm_fed.broker.pace import StepModel

    pace = StepModel()
    assert not pace.known and pace.step_s(8) == 0.0
    pace.observe(rows=8, steps=10, run_s=0.3)  # one size seen: 30 ms a step, half of it per row
    assert pace.step_s(8) == pytest.approx(0.03) and pace.step_s(16) == pytest.approx(0.045)
    pace.observe(rows=1, steps=10, run_s=0.1)  # 10 ms a step alone, 30 ms with 8 rows
    pace.observe(rows=8, steps=20, run_s=0.6)
    assert pace.step_s(1) == pytest.approx(0.01, rel=0.05) and pace.step_s(8) == pytest.approx(0.03, rel=0.05)
    assert pace.step_s(15) > pace.step_s(8)  # a bigger task's steps take longer, not the small task's pace
    # Three waves of up to 8 rows, each as long as its longest line.
    lengths = [10] * 7 + [40] + [5] * 8 + [20, 20]
    expected = 40 * pace.step_s(8) + 5 * pace.step_s(8) + 20 * pace.step_s(2)
    assert pace.batch_s(lengths, rows=8) == pytest.approx(expected)
    pace.observe(rows=0, steps=5, run_s=1.0)  # nothing to learn from: ignored
    assert pace.step_s(8) == pytest.approx(0.03, rel=0.05)


def test_a_batch_estimate_scales_out_to_free_replica_slots_only_when_that_ends_sooner():
    from types import SimpleNamespace

    from tpm_fed.batches.quoting import _estimated_s
    from tpm_fed.broker.pace import StepModel
    from tpm_fed.broker.placement import ReplicaView
    from tpm_fed.federation import Capacity, SiteConfig
    from tpm_fed.protocol.quotes import Quote

    pace = StepModel()
    pace.observe(rows=1, steps=10, run_s=0.1)
    pace.observe(rows=8, steps=10, run_s=0.1)  # a step takes 10 ms whatever the rows: 8 rows are free
    warm = ReplicaView(replica_id="r1", site="s", model="m", version="v", state="warm")

    def estimate(cold_start_s: float, slots: int) -> float:
        site = SiteConfig(name="s", capacity=Capacity(max_replicas=slots), cold_start_s=cold_start_s,
                          max_batch_requests=8)
        runtime = SimpleNamespace(federation=SimpleNamespace(site=lambda name: site),
                                  broker=SimpleNamespace(registry=SimpleNamespace(
                                      pace=lambda rid: pace, of_model=lambda model, version: [warm])))
        quote = Quote(project="p", model="m", version="v", kind="generate", site="s", replica="r1", cold=False,
                      free=False, max_su=1, expected_su=1, estimated_s=1, explanation="")
        return _estimated_s(runtime, [quote] * 64, [100] * 64, window=8)

    alone = 8 * 100 * 0.01  # 8 waves of 8 lines, 100 steps of 10 ms each
    assert estimate(cold_start_s=1.0, slots=1) == pytest.approx(alone)
    assert estimate(cold_start_s=1.0, slots=2) == pytest.approx(1.0 + alone / 2)  # a second replica pays
    assert estimate(cold_start_s=1.0, slots=4) == pytest.approx(1.0 + alone / 4)
    assert estimate(cold_start_s=60.0, slots=4) == pytest.approx(alone)  # a start slower than the work: no


def test_a_batchs_quotes_in_one_pass_equal_each_lines_quote_alone(runtime):
    """``quotes`` (a batch's lines) shares one broker decision among lines that place alike: each line's quote,
    or its refusal, must equal what ``quote`` gives that line alone."""
    model = str(runtime.default_model())
    lines = [GenerationRequest.create(prompt, model, max_new_tokens=tokens)
             for prompt, tokens in [("The cell", 8), ("The cell", 8), ("A star is", 8), ("The cell", 32),
                                    ("The river carries the silt", 8), ("A star is", 32)]]
    lines.insert(3, GenerationRequest.create("The cell", "no-such-model", max_new_tokens=8))
    lines += [GenerationRequest.create("The cell", model, max_new_tokens=8, site="elsewhere"),  # no such site
              GenerationRequest.create("The cell", model, max_new_tokens=8, site="elsewhere")]  # refused alike
    before = _books(runtime)
    together = runtime.quotes(lines)
    assert _books(runtime) == before
    for line, quote in zip(lines, together, strict=True):
        try:
            alone = runtime.quote(line)
        except Exception as error:  # noqa: BLE001 - the same refusal, with the same words
            assert type(quote) is type(error) and str(quote) == str(error)
        else:
            assert quote == alone
    assert sum(isinstance(quote, Exception) for quote in together) == 3
