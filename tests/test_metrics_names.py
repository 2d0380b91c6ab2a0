"""The metrics keep the federation's names and their series between requests (a batch counts every line), and
a federation file reloaded with a new model counts that model under its name at once."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from tpm_fed.service.metrics import ServiceMetrics


def _counted(metrics: ServiceMetrics) -> dict[str, float]:
    return {sample.labels["model"]: sample.value
            for family in text_string_to_metric_families(metrics.exposition()[0].decode())
            for sample in family.samples if sample.name == "tpm_requests_total"}


def _federation(*models: str) -> SimpleNamespace:
    return SimpleNamespace(models=[SimpleNamespace(name=m) for m in models], sites=[SimpleNamespace(name="a")],
                           projects=[SimpleNamespace(name="p")])


def test_a_reloaded_federations_new_model_is_counted_by_name_and_junk_stays_unknown():
    runtime = SimpleNamespace(federation=_federation("m1"))
    metrics = ServiceMetrics()
    metrics.runtime = runtime  # names only (no live replicas collected)
    result = SimpleNamespace(site="a", usage=None, charge=None, timings=None)
    for model in ("m1", "m2", "junk", "m1"):
        metrics.observe("generate", model, 0.1, result)
    assert _counted(metrics) == {"m1": 2.0, "unknown": 2.0}
    runtime.federation = _federation("m1", "m2")  # `tpm models add`, the file reloaded: a new object
    for model in ("m2", "junk"):
        metrics.observe("generate", model, 0.1, result)
    assert _counted(metrics) == {"m1": 2.0, "m2": 1.0, "unknown": 3.0}
