"""Defect 7: a caller cannot grow ``/metrics`` (and the service's memory) by naming junk models.

A refusal was counted under the model name the caller sent: 50 requests with
long junk names made 50 new series, kept for the life of the process. Label
values now come only from what the federation knows (``unknown`` otherwise).
The names here are valid names (up to 128 characters) of models that do not
exist, so they pass the edge's checks and are refused by the runtime, where
they are counted.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.service_helpers import ServiceThread
from tests.test_service_metrics import OPERATOR, TokenTable

JUNK = "no-such-model-{:03d}-" + "x" * 110  # 128 characters: the longest name the edge lets through


def scrape(url: str) -> tuple[int, dict[tuple[str, tuple], float]]:
    """``/metrics``' size in bytes, and its samples: (name, labels) -> value."""
    answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert answer.status_code == 200, answer.text
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(answer.text) for sample in family.samples}
    return len(answer.content), samples


def refuse(url: str, model: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=60,
                        json={"model": model, "prompt": "The cell", "max_tokens": 1})
    assert answer.status_code == 404, answer.text  # UnknownModel: refused by the runtime, and counted


def test_fifty_junk_model_names_leave_metrics_as_after_one(assembly, runtime):
    from tpm_fed.service.app import build_app

    app = build_app(assembly, TokenTable(runtime.owner), operators=frozenset({runtime.owner}))
    with ServiceThread(app) as url:
        _, before = scrape(url)  # the assembly's metrics count since it was built (other tests' requests too)
        refuse(url, JUNK.format(0))
        size_after_one, after_one = scrape(url)
        for index in range(1, 50):
            refuse(url, JUNK.format(index))
        size_after_fifty, after_fifty = scrape(url)
    assert set(after_fifty) == set(after_one)  # no new series per name
    assert size_after_fifty - size_after_one < 1024  # only counts moved (a few digits each)
    refused = {"kind": "generate", "model": "unknown", "site": "none", "outcome": "refused"}
    key = ("tpm_requests_total", tuple(sorted(refused.items())))
    assert after_fifty[key] - before.get(key, 0) == 50  # all counted, as unknown
