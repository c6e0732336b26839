"""The operator's Prometheus metrics: names, types, labels and meaning, as data.

This is part of the API a platform team depends on (dashboards and alerts name these series), so it
lives next to the CRD models: ``handlers/metrics.py`` registers exactly these, ``docs/metrics.md`` is
rendered from them by ``kubelora-crdgen``, and the unit tests hold the registry, the docs and the
chart's Grafana dashboard to this list.

Conventions (https://prometheus.io/docs/practices/naming/): the ``kubelora_`` prefix, base units
(seconds), ``_total`` on counters, and no label whose values grow with the number of objects, except
the per-LoRAJob training series, which exist only while a run is active (bounded by the LoRAJobs
that are training) and disappear when it ends or is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    name: str
    """The exposed name: counters end in ``_total``; a histogram adds ``_bucket``, ``_sum`` and ``_count``."""
    type: MetricType
    labels: tuple[str, ...]
    help: str

    @property
    def samples(self) -> tuple[str, ...]:
        """Every series name this metric exposes (what a PromQL expression may use)."""
        if self.type == "histogram":
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


RECONCILES = Metric(
    "kubelora_reconciles_total", "counter", ("kind", "result"),
    "Reconciles by kind (LoRAJob, AdapterDeployment) and result: success, stalled (no progress without the user: "
    "an action the API server refused for good, or an AdapterDeployment spec it cannot serve; see the Stalled "
    "condition) or error (an API call failed; retried with backoff).")
RECONCILE_DURATION = Metric(
    "kubelora_reconcile_duration_seconds", "histogram", ("kind",),
    "Wall time of one reconcile (LoRAJob) or supervisor tick (AdapterDeployment), API calls included.")
LORAJOBS = Metric(
    "kubelora_lorajobs", "gauge", ("namespace", "phase"),
    "LoRAJobs the operator watches, by namespace and status.phase (every phase is exposed, 0 included).")
ADAPTERDEPLOYMENTS = Metric(
    "kubelora_adapterdeployments", "gauge", ("namespace", "phase"),
    "AdapterDeployments the operator watches, by namespace and status.phase (every phase, 0 included).")
ADAPTERS = Metric(
    "kubelora_adapters", "gauge", ("namespace", "state"),
    "Adapters listed in AdapterDeployments' status.adapters, by namespace and state (Loaded: on every ready "
    "replica).")
TRAINING_STEP = Metric(
    "kubelora_lorajob_training_step", "gauge", ("namespace", "name"),
    "Optimizer step the trainer last reported (status.progress.step); only while the LoRAJob is not finished.")
TRAINING_TOTAL_STEPS = Metric(
    "kubelora_lorajob_training_total_steps", "gauge", ("namespace", "name"),
    "Steps the run will take (status.progress.totalSteps); only while the LoRAJob is not finished.")
TRAINING_LOSS = Metric(
    "kubelora_lorajob_training_loss", "gauge", ("namespace", "name"),
    "Training loss the trainer last reported (status.progress.loss); only while the LoRAJob is not finished.")
TRAINING_TOKENS = Metric(
    "kubelora_lorajob_training_tokens_per_second", "gauge", ("namespace", "name"),
    "Training throughput in tokens per second (status.progress.tokensPerSecond); only while not finished.")
TRAINING_ETA = Metric(
    "kubelora_lorajob_training_eta_seconds", "gauge", ("namespace", "name"),
    "The trainer's estimate of the seconds left (status.progress.etaSeconds); only while not finished.")
TIME_TO_TRAINING = Metric(
    "kubelora_lorajob_time_to_training_start_seconds", "histogram", (),
    "Seconds from a LoRAJob's creation to the start of its training Job (status.startTime): pre-flight, "
    "queueing and scheduling. Observed once per LoRAJob, when the operator sees the start.")
TIME_TO_SERVED = Metric(
    "kubelora_lorajob_time_to_adapter_served_seconds", "histogram", (),
    "Seconds from a LoRAJob's creation until an AdapterDeployment that references it reports its adapter "
    "Loaded: the whole train-publish-serve path. Observed once per AdapterDeployment, adapter and digest.")
API_ERRORS = Metric(
    "kubelora_api_errors_total", "counter", ("code",),
    "Failed Kubernetes API requests of the operator's client by HTTP status code (0: no response: connection "
    "error or timeout). 404 and 409 are often expected (gone, already exists) and handled.")

CATALOGUE: tuple[Metric, ...] = (
    RECONCILES, RECONCILE_DURATION, LORAJOBS, ADAPTERDEPLOYMENTS, ADAPTERS, TRAINING_STEP, TRAINING_TOTAL_STEPS,
    TRAINING_LOSS, TRAINING_TOKENS, TRAINING_ETA, TIME_TO_TRAINING, TIME_TO_SERVED, API_ERRORS)
TRAINING = (TRAINING_STEP, TRAINING_TOTAL_STEPS, TRAINING_LOSS, TRAINING_TOKENS, TRAINING_ETA)


def render_metrics_reference() -> str:
    """docs/metrics.md."""
    out = ["# KubeLoRA operator metrics", "",
           "Generated by `kubelora-crdgen` from `operator/kubelora/api/metrics.py`; do not edit. The operator serves "
           "them at `:8081/metrics` (`--metrics-port`, `KUBELORA_METRICS_PORT`; 0 turns it off), together with "
           "prometheus-client's `process_*` and `python_*` series. The chart's `monitoring.serviceMonitor` / "
           "`monitoring.podMonitor` values scrape them with the Prometheus Operator, and "
           "`monitoring.dashboard.enabled` ships a Grafana dashboard built on these names. "
           "`monitoring.servingPodMonitor` scrapes the serving pods: vLLM's own `vllm:*` metrics on the engine "
           "port and the agent's `kubelora_agent_*` metrics on the agent port (with `networkPolicy.enabled`, "
           "set `networkPolicy.prometheus` so the scrapes get through).", "",
           "| Name | Type | Labels | Meaning |", "| --- | --- | --- | --- |"]
    for metric in CATALOGUE:
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        out.append(f"| `{metric.name}` | {metric.type} | {labels} | {metric.help} |")
    return "\n".join(out) + "\n"
