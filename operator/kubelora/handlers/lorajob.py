"""kopf handlers for LoRAJob: thin wiring around :mod:`kubelora.reconcile.lorajob`.

* LoRAJob events -> reconcile when the object is new to the operator (created, or found at start:
  kopf's create/resume) or its spec changed (update). This is ``kopf.on.event`` with a generation
  check rather than ``kopf.on.create/update/resume``: kopf's change detection deep-copies and diffs
  the whole body on every event (status patches included) and writes a last-handled-configuration
  annotation per object, which was the largest cost of the operator at 1,000 LoRAJobs
  (see bench/RESULTS.md). Failed reconciles are retried with backoff by the reconciler.
* Job and Pod events, selected by the ``kubelora.io/lorajob`` label -> reconcile the owner, when
  the change can matter (finished, failed, running, going away). No polling.
* Two indexes keep a small summary of every labelled Job and Pod, so a reconcile reads its
  children from memory, and kopf fills them before any handler runs, so a restarted operator sees
  the Jobs it created before and never duplicates them.

Deletion needs no handler and no finalizer: every child has an ownerReference to the LoRAJob (the
pods to their Job), so the garbage collector removes them. Events for children that disappear
during that collection end in a 404 on the LoRAJob, which the reconciler ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from kubelora.api.common import GROUP, VERSION
from kubelora.handlers import lorajob_kopf, metrics
from kubelora.handlers.kube import API, KubeApi
from kubelora.handlers.lorajob_runner import Key, Observer, Reconciler
from kubelora.reconcile.lorajob import needs_reconcile
from kubelora.reconcile.lorajob_observed import (
    JobState,
    Observed,
    PodState,
    Signal,
    job_signal,
    job_state,
    pod_signal,
    pod_state,
)
from kubelora.resources.lorajob_names import NAME_ANNOTATION, label_value
from kubelora.resources.pods import LORAJOB_LABEL

JobIndex = kopf.Index[Key, JobState]
PodIndex = kopf.Index[Key, PodState]
CHILD = {LORAJOB_LABEL: kopf.PRESENT}

_reconciler: Reconciler | None = None
_seen: dict[str, Signal] = {}
"""Last signal per child uid: events that cannot change the outcome (most of them) are skipped."""


def reconciler() -> Reconciler:
    if _reconciler is None:
        raise kopf.TemporaryError("the LoRAJob reconciler is not started yet", delay=1)
    return _reconciler


@kopf.on.startup()
async def lorajob_startup(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    global _reconciler
    # Server-side filtering: only our Jobs reach the operator (Pods: see handlers.__init__).
    import kubelora.handlers as package  # the package imports this module: read it at start time

    settings.watching.label_selectors["batch", "jobs"] = LORAJOB_LABEL
    lorajob_kopf.install(settings)  # same essences, fewer deep copies on every watch event
    _reconciler = Reconciler(API, package.SETTINGS)


@kopf.on.cleanup()
async def lorajob_cleanup(**_: Any) -> None:
    if _reconciler is not None and isinstance(_reconciler.api, KubeApi):
        await _reconciler.api.close()


@kopf.index("batch", "v1", "jobs", labels=CHILD)
def lorajob_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, JobState]:
    return {(namespace or "", labels[LORAJOB_LABEL]): job_state(body)}


@kopf.index("", "v1", "pods", labels=CHILD)
def lorajob_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, PodState]:
    return {(namespace or "", labels[LORAJOB_LABEL]): pod_state(body)}


def observer(namespace: str | None, kwargs: Mapping[str, Any]) -> Observer:
    """Read a LoRAJob's children from the indexes (kopf passes them by name) at reconcile time."""
    jobs: JobIndex = kwargs["lorajob_jobs"]
    pods: PodIndex = kwargs["lorajob_pods"]

    def observe(name: str) -> Observed:
        key = (namespace or "", label_value(name))
        return Observed(jobs=tuple(jobs.get(key, ())), pods=tuple(pods.get(key, ())))
    return observe


@kopf.on.event(GROUP, VERSION, "lorajobs")
async def lorajob_event(type: str, body: kopf.Body, name: str, namespace: str | None, **kwargs: Any) -> None:
    metrics.lorajob_seen(type, body)
    if needs_reconcile(type, body):
        await reconciler().kick((namespace or "", name), observer(namespace, kwargs))


def owner_name(body: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """The LoRAJob's full name: pod annotation, then the Job's controller reference, then the label."""
    meta = body.get("metadata") or {}
    annotated = (meta.get("annotations") or {}).get(NAME_ANNOTATION)
    if annotated:
        return str(annotated)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "LoRAJob" and ref.get("controller"):
            return str(ref["name"])
    return labels[LORAJOB_LABEL]


def changed(type: str, uid: str, signal: Signal, fresh: Signal) -> bool:
    """Whether this event changed a child's signal; an unseen child counts as fresh (new Job, Pending pod)."""
    if type == "DELETED":
        _seen.pop(uid, None)
        return True
    if _seen.get(uid, fresh) == signal:
        _seen[uid] = signal
        return False
    _seen[uid] = signal
    return True


@kopf.on.event("batch", "v1", "jobs", labels=CHILD)
async def lorajob_job_event(type: str, body: kopf.Body, namespace: str | None, uid: str, labels: kopf.Labels,
                            **kwargs: Any) -> None:
    if changed(type, uid, job_signal(job_state(body)), job_signal(None)):
        await reconciler().kick((namespace or "", owner_name(body, labels)), observer(namespace, kwargs))


@kopf.on.event("", "v1", "pods", labels=CHILD)
async def lorajob_pod_event(type: str, body: kopf.Body, namespace: str | None, uid: str, labels: kopf.Labels,
                            **kwargs: Any) -> None:
    if changed(type, uid, pod_signal(pod_state(body)), pod_signal(None)):
        await reconciler().kick((namespace or "", owner_name(body, labels)), observer(namespace, kwargs))
