"""Prometheus metrics at ``GET /metrics``: what the service served, and how its replicas stand now.

Counters and histograms move as each request ends (:meth:`ServiceMetrics.observe`,
called once per request by :func:`tpm_fed.service.serving.serve`). The replicas'
running and waiting requests, and the SLO report, are read when Prometheus
scrapes (a custom collector), so they are never stale and cost nothing between
scrapes. Each app has its own registry: two services in one process (tests,
benchmarks) never share counters.

Every label value is one the federation knows (its models, sites and
projects) or ``unknown``: a refused request names whatever model the caller
typed, and a label per name would grow ``/metrics`` (and the service's
memory) without bound, a new series for every junk name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from tpm_fed.engine.interface import EngineClient
from tpm_fed.protocol.errors import TpmError

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""From a warm 1-token answer (milliseconds) to a cold start of a large model (minutes)."""

CALLER_ERRORS = frozenset({"InvalidRequest", "ContextLengthExceeded", "UnknownModel", "UnknownVersion",
                           "NotPermitted", "Unauthenticated", "InsufficientBalance", "AdapterMismatch"})
"""Refusals that are the caller's to fix: they do not count against availability."""


UNKNOWN = "unknown"
"""The label of a model, site or project the federation does not know."""


def outcome_of(error: BaseException | None) -> str:
    """``ok``, ``refused`` (the caller's to fix) or ``failed`` (the federation's fault)."""
    if error is None:
        return "ok"
    return "refused" if type(error).__name__ in CALLER_ERRORS else "failed"


class ServiceMetrics:
    """The service's metrics, in their own registry.

    Args:
        runtime: Read at scrape time for replicas' running and waiting requests.
        slo: Read at scrape time for p50/p95 and availability against targets (optional).
    """

    def __init__(self, runtime: EngineClient | None = None, slo: Any = None) -> None:
        self.runtime = runtime
        self.slo = slo
        self.registry = CollectorRegistry()
        self.requests = Counter("tpm_requests", "Requests served or refused, by kind, model, site and outcome",
                                ["kind", "model", "site", "outcome"], registry=self.registry)
        self.errors = Counter("tpm_errors", "Requests that ended in an error, by its type", ["type"],
                              registry=self.registry)
        self.tokens = Counter("tpm_tokens", "Tokens read (in) and generated (out)", ["model", "direction"],
                              registry=self.registry)
        self.charged = Counter("tpm_service_units_charged", "Service units charged, per project", ["project"],
                               registry=self.registry)
        self.cold_starts = Counter("tpm_cold_starts", "Requests that waited for a model to load",
                                   ["site", "model"], registry=self.registry)
        self.load_seconds = Counter("tpm_load_seconds", "Seconds spent loading models into replicas",
                                    ["site", "model"], registry=self.registry)
        self.queue_wait = Histogram("tpm_queue_wait_seconds", "Time a request waited (queue, transfer), by kind",
                                    ["kind"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.latency = Histogram("tpm_request_seconds", "End-to-end latency as the service saw it, by kind",
                                 ["kind"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        if runtime is not None or slo is not None:
            self.registry.register(_LiveState(runtime, slo))
        # Per request (a batch's every line), prometheus_client's labels() checks and locks per call, and
        # naming a known model scanned the federation's lists: ~27 us a request; the series and the names are
        # kept here instead (both bounded: every label value is a known name, ``unknown`` or a kind).
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._names: tuple[Any, dict[str, frozenset[str]]] = (None, {})

    def observe(self, kind: str, model: str, seconds: float, result: Any = None,
                error: BaseException | None = None) -> None:
        """Count one request that ended with ``result`` or ``error`` after ``seconds``.

        Its error, if any, is counted by :meth:`error` (the app's error handlers
        see every refusal, also those refused before a request was built).
        """
        outcome = outcome_of(error)
        model = self._known(model, "models")
        site = getattr(result, "site", None)
        site = self._known(site, "sites") if site else "none"
        self._of(self.requests, kind, model, site, outcome).inc()
        self._of(self.latency, kind).observe(seconds)
        if self.slo is not None:
            self.slo.record(kind, seconds, outcome)
        if error is not None:
            return
        usage = getattr(result, "usage", None)
        if usage is not None:
            self._of(self.tokens, model, "in").inc(usage.prompt_tokens)
            self._of(self.tokens, model, "out").inc(usage.completion_tokens)
        charge = getattr(result, "charge", None)
        if charge is not None:
            self._of(self.charged, self._known(charge.project, "projects")).inc(charge.charged_su)
        timings = getattr(result, "timings", None)
        if timings is not None:
            self._of(self.queue_wait, kind).observe(timings.queue_s)
            if timings.load_s > 0:
                self.cold_starts.labels(site, model).inc()
                self.load_seconds.labels(site, model).inc(timings.load_s)

    def _of(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept."""
        key = (id(metric), labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series

    def _known(self, name: str, kind: str) -> str:
        """``name`` if the federation has a model, site or project (``kind``) of that name, else ``unknown``."""
        federation = getattr(self.runtime, "federation", None)
        if federation is None or not isinstance(name, str):
            return UNKNOWN
        read_from, names = self._names
        if read_from is not federation:  # the federation file was reloaded (a new object): read its names again
            names = {of: frozenset(item.name for item in getattr(federation, of))
                     for of in ("models", "sites", "projects")}
            self._names = (federation, names)
        return name if name in names[kind] else UNKNOWN

    def error(self, error: BaseException) -> None:
        """Count a refusal or failure answered to a caller, by its type."""
        self.errors.labels(type(error).__name__ if isinstance(error, TpmError) else "InternalError").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text Prometheus scrapes, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveState:
    """Read at each scrape: requests running and waiting per replica; the SLO report."""

    def __init__(self, runtime: EngineClient, slo: Any) -> None:
        self.runtime = runtime
        self.slo = slo

    def collect(self) -> Iterator[Metric]:
        if self.runtime is not None:
            yield from self._replicas()
        if self.slo is not None:
            yield from self._slo()

    def _replicas(self) -> Iterator[Metric]:
        labels = ["site", "model", "version", "replica"]
        running = GaugeMetricFamily("tpm_replica_running", "Requests running on a replica now", labels=labels)
        waiting = GaugeMetricFamily("tpm_replica_waiting", "Requests waiting for a replica now", labels=labels)
        live = GaugeMetricFamily("tpm_replicas", "Replicas by site and state", labels=["site", "state"])
        by_state: dict[tuple[str, str], int] = {}
        queued = self.runtime.waiting_per_replica()
        for replica in self.runtime.broker.registry.all():
            by_state[(replica.site, replica.state)] = by_state.get((replica.site, replica.state), 0) + 1
            if not replica.live:
                continue
            names = [replica.site, replica.model, replica.version, replica.replica_id]
            waiting_now = queued.get(replica.replica_id, 0)
            waiting.add_metric(names, waiting_now)
            running.add_metric(names, max(0, replica.queue_depth - waiting_now))
        for (site, state), count in sorted(by_state.items()):
            live.add_metric([site, state], count)
        yield from (running, waiting, live)

    def _slo(self) -> Iterator[Metric]:
        labels = ["kind"]
        p50 = GaugeMetricFamily("tpm_slo_latency_p50_seconds", "p50 latency over the SLO window", labels=labels)
        p95 = GaugeMetricFamily("tpm_slo_latency_p95_seconds", "p95 latency over the SLO window", labels=labels)
        availability = GaugeMetricFamily("tpm_slo_availability", "Share of requests not failed by the federation "
                                         "over the SLO window", labels=labels)
        target_p95 = GaugeMetricFamily("tpm_slo_target_p95_seconds", "The operator's p95 latency target",
                                       labels=labels)
        target_availability = GaugeMetricFamily("tpm_slo_target_availability", "The operator's availability target",
                                                labels=labels)
        for row in self.slo.report()["kinds"]:
            if row["p50_s"] is not None:  # None: no request of this kind was served (refusals only)
                p50.add_metric([row["kind"]], row["p50_s"])
                p95.add_metric([row["kind"]], row["p95_s"])
            if row["availability"] is not None:
                availability.add_metric([row["kind"]], row["availability"])
            if row["target"]:
                target_p95.add_metric([row["kind"]], row["target"]["p95_latency_s"])
                target_availability.add_metric([row["kind"]], row["target"]["availability"])
        yield from (p50, p95, availability, target_p95, target_availability)
