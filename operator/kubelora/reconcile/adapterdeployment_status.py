"""The AdapterDeployment status: phase and conditions from replicas and per-adapter states.

Phases: Failed (the spec cannot be served, or no replica came up before the Deployment's progress
deadline), Pending (no replica ready yet), Progressing (serving, still converging), Degraded (serving, but an
adapter failed or a replica was lost after the rollout finished), Ready (the goal is reached). A pod is
Ready only when its agent has loaded every desired adapter, so ``readyReplicas`` already includes
adapter loading. Conditions follow kstatus: Ready=True means every replica is ready and every valid adapter
loaded; a failed adapter shows as Degraded=True without taking Ready away from the ones that work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubelora.api.adapterdeployment import AdapterDeploymentStatus, AdapterStatus
from kubelora.api.common import Condition
from kubelora.api.reasons import ConditionType, DeploymentPhase, Reason
from kubelora.reconcile.adapterdeployment_adapters import aggregate_adapters
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.reconcile.adapterdeployment_views import DeploymentView, ReplicaReport


@dataclass(frozen=True)
class Observed:
    """Everything the status is computed from, for one AdapterDeployment at one moment."""

    generation: int
    desired_replicas: int
    endpoint: str
    desired_adapters: int
    resolved: Sequence[ResolvedAdapter] = ()
    deployment: DeploymentView | None = None
    replicas: Sequence[ReplicaReport] = ()
    invalid: str | None = None
    """Why the spec cannot be served (InvalidSpec), or None."""


def _cond(kind: ConditionType, ok: bool, reason: Reason, message: str, generation: int) -> Condition:
    return Condition(type=kind, status="True" if ok else "False", reason=reason, message=message,
                     observed_generation=generation)


def _failed_message(adapters: Sequence[AdapterStatus]) -> str:
    return "; ".join(f"{a.name}: {a.reason or 'Failed'}" + (f" ({a.message})" if a.message else "")
                     for a in adapters if a.state == "Failed")


def _pending_message(adapters: Sequence[AdapterStatus]) -> str:
    return "; ".join(f"{a.name}: {a.state}" + (f" ({a.message})" if a.message else "")
                     for a in adapters if a.state not in ("Loaded", "Failed"))


def _phase_and_conditions(obs: Observed, adapters: Sequence[AdapterStatus]) -> tuple[DeploymentPhase, list[Condition]]:
    gen = obs.generation
    if obs.invalid is not None:
        return DeploymentPhase.FAILED, [
            _cond(ConditionType.READY, False, Reason.INVALID_SPEC, obs.invalid, gen),
            _cond(ConditionType.PROGRESSING, False, Reason.INVALID_SPEC, obs.invalid, gen),
            _cond(ConditionType.DEGRADED, False, Reason.INVALID_SPEC, obs.invalid, gen),
        ]
    dep = obs.deployment or DeploymentView()
    desired = obs.desired_replicas
    ready = dep.ready_replicas
    # An engine that answers serves the base model even while its pod is unready because an adapter loads.
    serving = ready > 0 or any(r.report is not None and r.report.engine_ready for r in obs.replicas)
    failed, pending = _failed_message(adapters), _pending_message(adapters)
    replica_msg = f"{ready}/{desired} replicas ready"
    if dep.deadline_exceeded and not serving and desired > 0:
        message = f"no replica became ready: {dep.message}" if dep.message else "no replica became ready"
        return DeploymentPhase.FAILED, [
            _cond(ConditionType.READY, False, Reason.REPLICAS_UNAVAILABLE, message, gen),
            _cond(ConditionType.PROGRESSING, False, Reason.REPLICAS_UNAVAILABLE, message, gen),
            _cond(ConditionType.DEGRADED, True, Reason.REPLICAS_UNAVAILABLE, message, gen),
        ]
    rolling = desired > 0 and (obs.deployment is None or not dep.rollout_complete or dep.updated_replicas < desired
                               or dep.observed_generation < dep.generation)
    short = ready < desired
    done = not short and not rolling and (not pending or desired == 0)
    lost = short and not rolling and not pending  # a replica went away after the rollout had finished
    if done:
        reason, message = Reason.ALL_READY, "scaled to zero replicas" if desired == 0 else replica_msg
    elif pending and serving:
        reason, message = Reason.ADAPTERS_PENDING, pending
    else:
        reason, message = Reason.REPLICAS_UNAVAILABLE, replica_msg
    ready_cond = _cond(ConditionType.READY, done, reason, message, gen)
    progressing = _cond(ConditionType.PROGRESSING, not done, reason, "" if done else message, gen)
    if failed:
        degraded = _cond(ConditionType.DEGRADED, True, Reason.ADAPTERS_FAILED, failed, gen)
    elif lost:
        degraded = _cond(ConditionType.DEGRADED, True, Reason.REPLICAS_UNAVAILABLE, replica_msg, gen)
    else:
        degraded = _cond(ConditionType.DEGRADED, False, reason, "", gen)
    conditions = [ready_cond, progressing, degraded]
    if desired > 0 and not serving:
        return DeploymentPhase.PENDING, conditions
    if degraded.status == "True":
        return DeploymentPhase.DEGRADED, conditions
    return (DeploymentPhase.READY if done else DeploymentPhase.PROGRESSING), conditions


def merge_conditions(previous: Sequence[Condition], new: Sequence[Condition], now: str) -> list[Condition]:
    """``new`` with lastTransitionTime kept from ``previous`` where the status did not change (sorted by type).

    Like ``upsert_condition`` but with the caller's clock, which keeps this module pure and testable.
    """
    before = {c.type: c for c in previous}
    out = []
    for cond in new:
        old = before.get(cond.type)
        keep = old is not None and old.status == cond.status and old.last_transition_time
        out.append(cond.model_copy(update={"last_transition_time": old.last_transition_time if keep and old else now}))
    return sorted(out, key=lambda c: c.type)


def aggregate_status(obs: Observed, previous: AdapterDeploymentStatus | None, now: str) -> AdapterDeploymentStatus:
    """The full status. With unchanged observations the result equals ``previous`` (no write needed)."""
    before = previous or AdapterDeploymentStatus()
    adapters = aggregate_adapters(obs.resolved, obs.replicas, before.adapters, now)
    phase, conditions = _phase_and_conditions(obs, adapters)
    merged = merge_conditions(before.conditions, conditions, now)
    loaded = sum(1 for a in adapters if a.state == "Loaded")
    dep = obs.deployment
    return AdapterDeploymentStatus(
        phase=phase,
        observed_generation=obs.generation,
        conditions=merged,
        replicas=dep.replicas if dep else 0,
        ready_replicas=dep.ready_replicas if dep else 0,
        endpoint=obs.endpoint,
        adapters=adapters,
        adapters_ready=f"{loaded}/{obs.desired_adapters}",
    )

