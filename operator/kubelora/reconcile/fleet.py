"""What the operator's metrics say, from the objects it watches. Pure: bodies and times in, numbers out.

:class:`Fleet` keeps a few fields of every LoRAJob and AdapterDeployment the operator sees (not the
bodies) and answers the gauges (counts by namespace and phase or state, live training progress) and
the one-off latencies to record when a watch event shows them for the first time:

* time to training start: ``creationTimestamp`` -> ``status.startTime`` of a LoRAJob, once per uid;
* time to adapter served: the LoRAJob's ``creationTimestamp`` -> the AdapterDeployment adapter's
  ``lastTransitionTime`` into Loaded, once per (AdapterDeployment uid, adapter, digest).

What an object already shows when the operator first sees it (after a restart, say) was recorded by
an earlier process, or never can be honestly, so it is remembered as seen without being recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubelora.api.reasons import DeploymentPhase, JobPhase

Key = tuple[str, str]
"""(namespace, name)."""
FINISHED = frozenset({JobPhase.SUCCEEDED.value, JobPhase.FAILED.value})
ADAPTER_STATES = ("Pending", "Downloading", "Loading", "Loaded", "Unloading", "Failed")


def timestamp(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (None when absent or malformed)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Training:
    """The live progress of one unfinished LoRAJob."""

    step: float | None
    total_steps: float | None
    loss: float | None
    tokens_per_second: float | None
    eta_seconds: float | None


@dataclass(frozen=True)
class JobSummary:
    uid: str
    phase: str
    created: float | None
    started: float | None
    training: Training | None


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    state: str
    digest: str
    since: float | None
    lorajob: str | None
    """The LoRAJob the spec takes it from, if any."""


@dataclass(frozen=True)
class DeploymentSummary:
    uid: str
    phase: str
    adapters: tuple[ServedAdapter, ...]


@dataclass(frozen=True)
class Latency:
    """One value for a histogram: ``kind`` is ``training_start`` or ``adapter_served``."""

    kind: str
    seconds: float


def job_summary(body: Mapping[str, Any]) -> JobSummary:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    phase = str(status.get("phase") or JobPhase.PENDING.value)
    progress = status.get("progress") or {}
    training = None
    if progress and phase not in FINISHED:
        training = Training(step=_number(progress.get("step")), total_steps=_number(progress.get("totalSteps")),
                            loss=_number(progress.get("loss")),
                            tokens_per_second=_number(progress.get("tokensPerSecond")),
                            eta_seconds=_number(progress.get("etaSeconds")))
    return JobSummary(uid=str(meta.get("uid", "")), phase=phase, created=timestamp(meta.get("creationTimestamp")),
                      started=timestamp(status.get("startTime")), training=training)


def deployment_summary(body: Mapping[str, Any]) -> DeploymentSummary:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    sources = {str(a.get("name")): (a.get("loraJobRef") or {}).get("name")
               for a in (body.get("spec") or {}).get("adapters") or [] if isinstance(a, Mapping)}
    adapters = tuple(
        ServedAdapter(name=str(a.get("name", "")), state=str(a.get("state") or "Pending"),
                      digest=str(a.get("digest") or ""), since=timestamp(a.get("lastTransitionTime")),
                      lorajob=sources.get(str(a.get("name", ""))))
        for a in status.get("adapters") or [] if isinstance(a, Mapping))
    return DeploymentSummary(uid=str(meta.get("uid", "")),
                             phase=str(status.get("phase") or DeploymentPhase.PENDING.value), adapters=adapters)


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Fleet:
    """Every watched LoRAJob and AdapterDeployment, as the metrics need them."""

    def __init__(self) -> None:
        self.jobs: dict[Key, JobSummary] = {}
        self.deployments: dict[Key, DeploymentSummary] = {}
        self._started: set[str] = set()
        self._served: set[tuple[str, str, str]] = set()

    def lorajob_event(self, type: str | None, body: Mapping[str, Any]) -> list[Latency]:
        """A LoRAJob watch event (None: the operator's first listing); the latencies it reveals."""
        key = _key(body)
        if type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
            gone = self.jobs.pop(key, None)
            if gone is not None:
                self._started.discard(gone.uid)
            return []
        summary = job_summary(body)
        first_sight = key not in self.jobs or self.jobs[key].uid != summary.uid
        self.jobs[key] = summary
        if summary.started is None or summary.uid in self._started:
            return []
        self._started.add(summary.uid)
        if first_sight or summary.created is None:
            return []
        return [Latency("training_start", max(summary.started - summary.created, 0.0))]

    def adapterdeployment_event(self, type: str | None, body: Mapping[str, Any]) -> list[Latency]:
        """An AdapterDeployment watch event; the adapter-served latencies it reveals."""
        key = _key(body)
        if type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
            gone = self.deployments.pop(key, None)
            if gone is not None:
                self._served = {s for s in self._served if s[0] != gone.uid}
            return []
        summary = deployment_summary(body)
        first_sight = key not in self.deployments or self.deployments[key].uid != summary.uid
        self.deployments[key] = summary
        out = []
        for adapter in summary.adapters:
            mark = (summary.uid, adapter.name, adapter.digest)
            if adapter.state != "Loaded" or mark in self._served:
                continue
            self._served.add(mark)
            job = self.jobs.get((key[0], adapter.lorajob)) if adapter.lorajob else None
            if first_sight or job is None or job.created is None:
                continue
            end = adapter.since if adapter.since is not None else job.created
            out.append(Latency("adapter_served", max(end - job.created, 0.0)))
        return out

    # -- the gauges ---------------------------------------------------------------------------------
    def lorajobs_by_phase(self) -> dict[tuple[str, str], int]:
        """(namespace, phase) -> count, with every phase of every namespace that has a LoRAJob."""
        return _by(((ns, job.phase) for (ns, _), job in self.jobs.items()), [p.value for p in JobPhase])

    def adapterdeployments_by_phase(self) -> dict[tuple[str, str], int]:
        return _by(((ns, d.phase) for (ns, _), d in self.deployments.items()), [p.value for p in DeploymentPhase])

    def adapters_by_state(self) -> dict[tuple[str, str], int]:
        pairs = ((ns, a.state) for (ns, _), d in self.deployments.items() for a in d.adapters)
        return _by(pairs, ADAPTER_STATES, namespaces={ns for ns, _ in self.deployments})

    def training(self) -> dict[Key, Training]:
        """Live progress of every unfinished LoRAJob that reported some."""
        return {key: job.training for key, job in self.jobs.items() if job.training is not None}


def _by(pairs: Iterable[tuple[str, str]], values: Iterable[str],
        namespaces: set[str] | None = None) -> dict[tuple[str, str], int]:
    counts = Counter(pairs)
    spaces = {ns for ns, _ in counts} | (namespaces or set())
    out = {(ns, value): 0 for ns in sorted(spaces) for value in values}
    out.update(counts)
    return out
