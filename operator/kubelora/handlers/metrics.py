"""The operator's Prometheus metrics (prometheus-client), as listed in :mod:`kubelora.api.metrics`.

Counters and histograms are updated where things happen (a reconcile, an API error); the gauges are
computed at scrape time from :class:`~kubelora.reconcile.fleet.Fleet`, which the watch handlers feed,
so a deleted or finished object's series vanish with it instead of lingering at their last value.
Everything goes into prometheus-client's default registry, next to its process and Python collectors.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubelora.api import metrics as spec
from kubelora.reconcile.fleet import Fleet, Latency, Training

log = logging.getLogger(__name__)

SUCCESS, STALLED, ERROR = "success", "stalled", "error"
LATENCY_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)


def _base(metric: spec.Metric) -> str:
    """prometheus-client adds ``_total`` to counters itself."""
    return metric.name.removesuffix("_total") if metric.type == "counter" else metric.name


RECONCILES = Counter(_base(spec.RECONCILES), spec.RECONCILES.help, spec.RECONCILES.labels)
RECONCILE_DURATION = Histogram(spec.RECONCILE_DURATION.name, spec.RECONCILE_DURATION.help,
                               spec.RECONCILE_DURATION.labels)
API_ERRORS = Counter(_base(spec.API_ERRORS), spec.API_ERRORS.help, spec.API_ERRORS.labels)
LATENCIES = {
    "training_start": Histogram(spec.TIME_TO_TRAINING.name, spec.TIME_TO_TRAINING.help, buckets=LATENCY_BUCKETS),
    "adapter_served": Histogram(spec.TIME_TO_SERVED.name, spec.TIME_TO_SERVED.help, buckets=LATENCY_BUCKETS),
}
FLEET = Fleet()
"""What the watch handlers have seen; read at scrape time."""

_TRAINING_FIELDS: tuple[tuple[spec.Metric, str], ...] = (
    (spec.TRAINING_STEP, "step"), (spec.TRAINING_TOTAL_STEPS, "total_steps"), (spec.TRAINING_LOSS, "loss"),
    (spec.TRAINING_TOKENS, "tokens_per_second"), (spec.TRAINING_ETA, "eta_seconds"))


class FleetCollector(Collector):
    """The gauges, from a :class:`Fleet` at scrape time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def describe(self) -> Iterable[Metric]:
        """Names only: registering must not read a half-built fleet."""
        gauges = (spec.LORAJOBS, spec.ADAPTERDEPLOYMENTS, spec.ADAPTERS, *spec.TRAINING)
        return [GaugeMetricFamily(m.name, m.help, labels=m.labels) for m in gauges]

    def collect(self) -> Iterable[Metric]:
        for metric, counts in ((spec.LORAJOBS, self.fleet.lorajobs_by_phase()),
                               (spec.ADAPTERDEPLOYMENTS, self.fleet.adapterdeployments_by_phase()),
                               (spec.ADAPTERS, self.fleet.adapters_by_state())):
            family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            for labels, count in sorted(counts.items()):
                family.add_metric(list(labels), count)
            yield family
        training = sorted(self.fleet.training().items())
        for metric, attr in _TRAINING_FIELDS:
            family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            for (namespace, name), progress in training:
                value = _field(progress, attr)
                if value is not None:
                    family.add_metric([namespace, name], value)
            yield family


def _field(progress: Training, attr: str) -> float | None:
    value = getattr(progress, attr)
    return float(value) if value is not None else None


REGISTRY.register(FleetCollector(FLEET))


def record(latencies: Iterable[Latency]) -> None:
    for latency in latencies:
        LATENCIES[latency.kind].observe(latency.seconds)


def lorajob_seen(type: str | None, body: Mapping[str, Any]) -> None:
    """Every LoRAJob watch event, from the handler that already receives it."""
    record(FLEET.lorajob_event(type, body))


def adapterdeployment_seen(type: str | None, body: Mapping[str, Any]) -> None:
    record(FLEET.adapterdeployment_event(type, body))


def api_error(status: int) -> None:
    API_ERRORS.labels(code=str(status)).inc()


class Outcome:
    """What a timed reconcile ended as; set ``result`` to STALLED when it was refused for good."""

    def __init__(self) -> None:
        self.result = SUCCESS


@contextlib.contextmanager
def reconciling(kind: str) -> Iterator[Outcome]:
    """Time one reconcile and count its result. The caller sets ``outcome.result`` for what it handles;
    an exception that escapes counts as ERROR; cancellation (shutdown) is not a reconcile result."""
    outcome = Outcome()
    start = time.perf_counter()
    try:
        yield outcome
    except Exception:
        _count(kind, ERROR, start)
        raise
    _count(kind, outcome.result, start)


def _count(kind: str, result: str, start: float) -> None:
    RECONCILE_DURATION.labels(kind=kind).observe(time.perf_counter() - start)
    RECONCILES.labels(kind=kind, result=result).inc()


def serve(port: int, address: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` from a daemon thread (prometheus-client's own server); port 0 serves nothing."""
    if port:
        start_http_server(port, addr=address, registry=registry)
        log.info("serving Prometheus metrics on %s:%d/metrics", address, port)
