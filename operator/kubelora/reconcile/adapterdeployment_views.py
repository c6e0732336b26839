"""Small, typed views of the objects the AdapterDeployment status is computed from.

kopf indexes keep these views (not whole bodies) in memory, and the aggregation in
``adapterdeployment_status`` takes them as plain values, which keeps it a pure function that unit tests
feed with literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubelora.api.runtime import AgentReport


@dataclass(frozen=True)
class DeploymentView:
    """What the Deployment controller reports about the serving pods."""

    generation: int = 0
    observed_generation: int = 0
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    rollout_complete: bool = False
    """Progressing=True with reason NewReplicaSetAvailable: the current template is fully rolled out."""
    deadline_exceeded: bool = False
    message: str = ""
    replica_failure: str = ""
    """Message of the ReplicaFailure=True condition: the ReplicaSet cannot create pods (quota, admission)."""


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def deployment_view(body: Mapping[str, Any]) -> DeploymentView:
    status = body.get("status") or {}
    progressing = _condition(status, "Progressing")
    return DeploymentView(
        generation=int(body.get("metadata", {}).get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        replicas=int(status.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        rollout_complete=progressing.get("reason") == "NewReplicaSetAvailable",
        deadline_exceeded=progressing.get("reason") == "ProgressDeadlineExceeded",
        message=str(progressing.get("message") or ""),
        replica_failure=_replica_failure(status),
    )


def _replica_failure(status: Mapping[str, Any]) -> str:
    cond = _condition(status, "ReplicaFailure")
    if cond.get("status") != "True":
        return ""
    return str(cond.get("message") or cond.get("reason") or "the ReplicaSet cannot create pods")


STALLED_WAITING_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                     "CreateContainerConfigError", "CreateContainerError"})
"""Container waiting reasons that need the user (image name, pull secret, a missing Secret or ConfigMap)."""


@dataclass(frozen=True)
class PodBlocker:
    """Why a serving pod cannot start: the scheduler's verdict or a container stuck waiting."""

    reason: str
    message: str
    stalled: bool
    """True at once (image pull, missing Secret); False for Unschedulable, which gets a grace period."""
    since: str = ""
    """lastTransitionTime of the PodScheduled=False condition (Unschedulable only)."""


def pod_blocker(status: Mapping[str, Any]) -> PodBlocker | None:
    if status.get("phase") not in (None, "Pending"):
        return None
    scheduled = _condition(status, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason"):
        return PodBlocker(str(scheduled["reason"]), str(scheduled.get("message") or ""), stalled=False,
                          since=str(scheduled.get("lastTransitionTime") or ""))
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STALLED_WAITING_REASONS:
            return PodBlocker(str(waiting["reason"]), str(waiting.get("message") or ""), stalled=True)
    return None


@dataclass(frozen=True)
class PodView:
    """A serving pod: whether its agent can be asked, and what restarts it has had."""

    name: str
    uid: str
    ip: str | None
    phase: str
    ready: bool
    terminating: bool
    restarts: int = 0
    blocker: PodBlocker | None = None

    @property
    def pollable(self) -> bool:
        """Running with an IP and not going away: its agent answers /adapters."""
        return self.phase == "Running" and bool(self.ip) and not self.terminating


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    ready = _condition(status, "Ready").get("status") == "True"
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return PodView(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        ip=status.get("podIP") or None,
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        restarts=restarts,
        blocker=pod_blocker(status),
    )


@dataclass(frozen=True)
class ReplicaReport:
    """One pod's answer to GET /adapters, or why there is none."""

    pod: str
    ready: bool
    report: AgentReport | None = None
    error: str = ""
