"""What the operator knows about a LoRAJob's Jobs and Pods, as small immutable summaries.

The kopf indexes keep one summary per child (not the whole body), so memory stays flat with
thousands of jobs, and the reconciler is a pure function of (LoRAJob, summaries). Parsing lives
here, next to the types, so the unit tests feed the same raw dicts the API server returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubelora.api.runtime import EXIT_BAD_INPUT, EXIT_STOPPED, TrainerResult
from kubelora.resources.lorajob_names import (
    CONTAINER_NAME,
    JOB_NAME_LABEL,
    PREFLIGHT_COMPONENT,
    TRAINER_COMPONENT,
    revision_of,
)
from kubelora.resources.pods import COMPONENT, QUEUE_LABEL

STALLED_WAITING_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                     "CreateContainerConfigError", "CreateContainerError"})
"""Container waiting reasons that need the user (image name, pull secret, a missing Secret or ConfigMap)."""


@dataclass(frozen=True)
class Termination:
    """The trainer container's terminated state."""

    exit_code: int
    reason: str = ""
    message: str = ""

    def result(self) -> TrainerResult | None:
        return parse_trainer_result(self.message)


@dataclass(frozen=True)
class JobState:
    name: str
    component: str
    revision: int | None
    uid: str = ""
    created: str = ""
    deleting: bool = False
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    complete: bool = False
    failed_reason: str | None = None
    """Reason of the Job's Failed condition (BackoffLimitExceeded, DeadlineExceeded), None if not failed."""
    failed_message: str = ""
    completion_time: str | None = None
    owner_uid: str = ""
    """uid of the Job's controller owner: children of an earlier LoRAJob of the same name do not count."""
    suspended: bool = False
    """``spec.suspend`` of the Job: set by the operator (suspend) or held by Kueue (queued)."""
    queued: bool = False
    """The Job carries Kueue's queue-name label."""

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None

    @property
    def live(self) -> bool:
        """Still able to run a pod: not finished and not being deleted."""
        return not self.finished and not self.deleting


Signal = tuple[object, ...]
"""The part of a child's summary that can change a reconcile's outcome (see ``job_signal``)."""


def job_signal(job: JobState | None) -> Signal:
    """Finished, failed (and how often), or going away. A new Job, or one that got a pod, changes nothing."""
    if job is None:
        return (False, None, False, 0, False)
    return (job.complete, job.failed_reason, job.deleting, job.failed, job.suspended)


@dataclass(frozen=True)
class PodState:
    name: str
    job_name: str
    component: str
    revision: int | None
    phase: str = "Pending"
    created: str = ""
    deleting: bool = False
    termination: Termination | None = None
    owner_uid: str = ""
    """uid of the pod's controller (its Job)."""
    blocker: Blocker | None = None
    """Why a Pending pod does not start (scheduler, image pull), as the cluster says it."""

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Blocker:
    """What keeps a pod from running: ``reason`` as Kubernetes names it, ``message`` as it words it."""

    reason: str
    message: str
    stalled: bool
    """True when only the user can clear it (bad image, missing Secret); False when the cluster may (scheduling)."""


def pod_signal(pod: PodState | None) -> Signal:
    """Running, finished (with its termination), blocked or going away; a new Pending pod changes nothing."""
    if pod is None:
        return ("Pending", None, False, None)
    return (pod.phase if pod.phase in ("Running", "Succeeded", "Failed") else "Pending", pod.termination,
            pod.deleting, pod.blocker)


@dataclass(frozen=True)
class Observed:
    """Every Job and Pod labelled with the LoRAJob's name."""

    jobs: tuple[JobState, ...] = ()
    pods: tuple[PodState, ...] = ()
    inputs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """LoRAJobs named in spec.combine.inputs that published an adapter: name -> (uri, digest)."""

    def owned_by(self, uid: str) -> Observed:
        """Only the children of the LoRAJob with this uid: Jobs it controls, and the pods of those Jobs.

        A LoRAJob deleted and re-created under the same name has a new uid; the old one's children
        may live on while the garbage collector removes them, and must never count as this one's.
        """
        jobs = tuple(j for j in self.jobs if j.owner_uid == uid)
        uids = {j.uid for j in jobs}
        return Observed(jobs=jobs, pods=tuple(p for p in self.pods if p.owner_uid in uids), inputs=self.inputs)

    def job(self, name: str | None) -> JobState | None:
        return next((j for j in self.jobs if j.name == name), None) if name else None

    def pods_of(self, job_name: str) -> list[PodState]:
        return sorted((p for p in self.pods if p.job_name == job_name), key=lambda p: (p.created, p.name))

    def training_jobs(self, revision: int) -> list[JobState]:
        """Training Jobs of one revision, oldest first."""
        return sorted((j for j in self.jobs if j.component == TRAINER_COMPONENT and j.revision == revision),
                      key=lambda j: (j.created, j.name))

    def live_training_pods(self, revision: int) -> list[PodState]:
        """Trainer pods of ``revision`` that may still write checkpoints (not finished)."""
        return [p for p in self.pods if p.component == TRAINER_COMPONENT and p.revision == revision
                and not p.done]


def _labels(body: Mapping[str, Any]) -> Mapping[str, str]:
    return body.get("metadata", {}).get("labels") or {}


def controller_uid(body: Mapping[str, Any]) -> str:
    """uid of the object's controller ownerReference ('' if none)."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return ""


def job_state(body: Mapping[str, Any]) -> JobState:
    """Summarise a batch/v1 Job (conditions Complete/Failed as set by the Job controller)."""
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    complete, failed_reason, failed_message = False, None, ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") == "Failed":
            failed_reason = cond.get("reason") or "Failed"
            failed_message = cond.get("message") or ""
    labels = _labels(body)
    return JobState(
        name=meta.get("name", ""), component=labels.get(COMPONENT, ""), revision=revision_of(labels),
        uid=meta.get("uid", ""), created=meta.get("creationTimestamp") or "",
        deleting=bool(meta.get("deletionTimestamp")), active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0), failed=int(status.get("failed") or 0),
        complete=complete, failed_reason=failed_reason, failed_message=failed_message,
        completion_time=status.get("completionTime"), owner_uid=controller_uid(body),
        suspended=(body.get("spec") or {}).get("suspend") is True, queued=QUEUE_LABEL in labels,
    )


def _termination(status: Mapping[str, Any]) -> Termination | None:
    statuses = status.get("containerStatuses") or []
    for cs in sorted(statuses, key=lambda c: c.get("name") != CONTAINER_NAME):
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated:
            return Termination(exit_code=int(terminated.get("exitCode", 1)), reason=terminated.get("reason") or "",
                               message=terminated.get("message") or "")
    return None


def pod_blocker(status: Mapping[str, Any]) -> Blocker | None:
    """The scheduler's Unschedulable verdict, or a container stuck waiting on something only the user can fix."""
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            return Blocker(str(cond["reason"]), str(cond.get("message") or ""), stalled=False)
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STALLED_WAITING_REASONS:
            return Blocker(str(waiting["reason"]), str(waiting.get("message") or ""), stalled=True)
    return None


def pod_state(body: Mapping[str, Any]) -> PodState:
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    labels = _labels(body)
    return PodState(
        name=meta.get("name", ""), job_name=labels.get(JOB_NAME_LABEL, ""), component=labels.get(COMPONENT, ""),
        revision=revision_of(labels), phase=status.get("phase") or "Pending",
        created=meta.get("creationTimestamp") or "", deleting=bool(meta.get("deletionTimestamp")),
        termination=_termination(status), owner_uid=controller_uid(body), blocker=pod_blocker(status),
    )


def parse_trainer_result(message: str) -> TrainerResult | None:
    """The TrainerResult in a termination message: the whole text, or else its last JSON line.

    With ``FallbackToLogsOnError`` the message may be log lines; the result, if any, is the last one.
    """
    text = (message or "").strip()
    if not text:
        return None
    for candidate in [text, *reversed(text.splitlines())]:
        candidate = candidate.strip()
        if not candidate.startswith("{"):
            continue
        try:
            return TrainerResult.model_validate(json.loads(candidate))
        except (ValueError, ValidationError):
            continue
    return None


def observe(jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> Observed:
    """Build :class:`Observed` from raw bodies (tests, and lists fetched when the indexes lag)."""
    return Observed(jobs=tuple(job_state(j) for j in jobs), pods=tuple(pod_state(p) for p in pods))


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_STOPPED",
    "PREFLIGHT_COMPONENT",
    "TRAINER_COMPONENT",
    "Blocker",
    "JobState",
    "Observed",
    "PodState",
    "Signal",
    "Termination",
    "controller_uid",
    "job_signal",
    "job_state",
    "observe",
    "parse_trainer_result",
    "pod_blocker",
    "pod_signal",
    "pod_state",
]
