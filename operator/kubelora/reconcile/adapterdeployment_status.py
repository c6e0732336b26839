"""The AdapterDeployment status: phase and conditions from replicas, pods and per-adapter states.

Conditions follow the contract in :mod:`kubelora.api.reasons`. ``Stalled=True`` (kstatus: Failed) when no
progress is possible without the user: an invalid spec, a child the API server refuses for good (403/422),
a serving pod that cannot pull its image or has waited unschedulable past a rollout's grace, pods the
ReplicaSet may not create (quota, admission), or a first rollout past its deadline. ``Reconciling=True``
(kstatus: InProgress) while it converges or retries. ``Ready=True`` when every replica is ready and every
valid adapter loaded. ``Progressing`` mirrors Reconciling; ``Degraded=True`` means serving with a flaw (a
failed adapter, a lost replica, a stall while the old pods still serve).

An invalid spec or a refused apply *holds* the status: the last applied adapters stay listed (they are
still served, and the resolver needs them to keep a retraining LoRAJob's adapter), and a refused apply
keeps the old ``observedGeneration``, since that generation is not applied.

Phases: Failed (stalled and nothing serves), Pending (no replica ready yet), Progressing (serving, still
converging), Degraded (serving with a flaw), Ready (the goal is reached).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kubelora.api.adapterdeployment import AdapterDeploymentStatus, AdapterStatus
from kubelora.api.common import Condition
from kubelora.api.reasons import ConditionType, DeploymentPhase, Reason
from kubelora.reconcile.adapterdeployment_adapters import aggregate_adapters, bounded
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.reconcile.adapterdeployment_views import DeploymentView, PodView, ReplicaReport

UNSCHEDULABLE_GRACE_SECONDS = 60.0
"""An unschedulable serving pod is Reconciling this long, then Stalled. A GPU rollout (maxSurge 0) starts
the new pod while the old one still holds the GPU for up to its 30 s termination grace period."""


@dataclass(frozen=True)
class Refusal:
    """The API server refused to apply a child: ``persistent`` (400/403/422) needs the user."""

    reason: Reason
    message: str
    persistent: bool


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
    refused: Refusal | None = None
    """Why this generation's children could not be applied, or None."""
    pods: Sequence[PodView] = ()
    selector: str = ""


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    message: str


def _cond(kind: ConditionType, ok: bool, reason: Reason, message: str, generation: int) -> Condition:
    return Condition(type=kind, status="True" if ok else "False", reason=reason, message=message,
                     observed_generation=generation)


MAX_LISTED_ADAPTERS = 5
"""Adapters a condition message names; the rest are counted (every condition repeats the message)."""
MAX_CONDITION_MESSAGE = 1024


def _listing(entries: list[str]) -> str:
    """``a; b; c; ... and N more``: a message that stays short at a thousand adapters."""
    shown = "; ".join(entries[:MAX_LISTED_ADAPTERS])
    if len(entries) > MAX_LISTED_ADAPTERS:
        shown += f"; ... and {len(entries) - MAX_LISTED_ADAPTERS} more"
    return bounded(shown, MAX_CONDITION_MESSAGE)


def _failed_message(adapters: Sequence[AdapterStatus]) -> str:
    return _listing([f"{a.name}: {a.reason or 'Failed'}" + (f" ({bounded(a.message, 120)})" if a.message else "")
                     for a in adapters if a.state == "Failed"])


def _pending_message(adapters: Sequence[AdapterStatus]) -> str:
    return _listing([f"{a.name}: {a.state}" + (f" ({bounded(a.message, 120)})" if a.message else "")
                     for a in adapters if a.state not in ("Loaded", "Failed")])


def _age(since: str, now: str) -> float:
    try:
        return (datetime.fromisoformat(now) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return 0.0


def _pod_verdicts(pods: Sequence[PodView], now: str) -> tuple[Verdict | None, Verdict | None]:
    """(a stall, a wait) among the serving pods: image pull and the like stall at once; Unschedulable only
    after the grace period."""
    stall = wait = None
    for pod in sorted(pods, key=lambda p: p.name):
        b = pod.blocker
        if b is None or pod.terminating:
            continue
        message = f"pod {pod.name}: {b.reason}" + (f": {b.message}" if b.message else "")
        unschedulable = b.reason == "Unschedulable"
        reason = Reason.UNSCHEDULABLE if unschedulable else Reason.POD_BLOCKED
        if b.stalled or (unschedulable and _age(b.since, now) >= UNSCHEDULABLE_GRACE_SECONDS):
            stall = stall or Verdict(reason, message)
        else:
            wait = wait or Verdict(reason, message)
    return stall, wait


def _stall(obs: Observed, dep: DeploymentView, serving: bool, pod_stall: Verdict | None) -> Verdict | None:
    """What needs the user, most fundamental first."""
    if obs.invalid is not None:
        kept = "; the previous adapters keep being served" if serving else ""
        return Verdict(Reason.INVALID_SPEC, obs.invalid + kept)
    if obs.refused is not None and obs.refused.persistent:
        return Verdict(obs.refused.reason, obs.refused.message)
    if obs.deployment is not None and dep.replica_failure:
        return Verdict(Reason.REPLICA_FAILURE, f"the ReplicaSet cannot create pods: {dep.replica_failure}")
    if pod_stall is not None:
        return pod_stall
    if dep.deadline_exceeded and not serving and obs.desired_replicas > 0:
        message = f"no replica became ready: {dep.message}" if dep.message else "no replica became ready"
        return Verdict(Reason.REPLICAS_UNAVAILABLE, message)
    return None


def _phase_and_conditions(obs: Observed, adapters: Sequence[AdapterStatus],
                          now: str) -> tuple[DeploymentPhase, list[Condition], str]:
    gen = obs.generation
    dep = obs.deployment or DeploymentView()
    desired = obs.desired_replicas
    ready = dep.ready_replicas
    # An engine that answers serves the base model even while its pod is unready because an adapter loads.
    serving = ready > 0 or any(r.report is not None and r.report.engine_ready for r in obs.replicas)
    failed, pending = _failed_message(adapters), _pending_message(adapters)
    if obs.invalid is not None or obs.refused is not None:
        failed = pending = ""  # held: the adapters listed are those of the last applied generation
    replica_msg = f"{ready}/{desired} replicas ready"
    pod_stall, pod_wait = _pod_verdicts(obs.pods, now)
    stall = _stall(obs, dep, serving, pod_stall)
    rolling = desired > 0 and (obs.deployment is None or not dep.rollout_complete or dep.updated_replicas < desired
                               or dep.observed_generation < dep.generation)
    short = ready < desired
    done = stall is None and obs.refused is None and not short and not rolling and (not pending or desired == 0)
    lost = short and not rolling and not pending  # a replica went away after the rollout had finished
    if stall is not None:
        verdict = stall
    elif obs.refused is not None:
        verdict = Verdict(Reason.API_RETRYING, obs.refused.message)
    elif done:
        verdict = Verdict(Reason.ALL_READY, "scaled to zero replicas" if desired == 0 else replica_msg)
    elif pod_wait is not None:
        verdict = pod_wait
    elif pending and serving:
        verdict = Verdict(Reason.ADAPTERS_PENDING, pending)
    else:
        verdict = Verdict(Reason.REPLICAS_UNAVAILABLE, replica_msg)
    reason, message = verdict.reason, verdict.message
    reconciling = not done and stall is None
    if stall is not None and serving:
        degraded = _cond(ConditionType.DEGRADED, True, reason, message, gen)
    elif failed:
        degraded = _cond(ConditionType.DEGRADED, True, Reason.ADAPTERS_FAILED, failed, gen)
    elif lost and stall is None:
        degraded = _cond(ConditionType.DEGRADED, True, Reason.REPLICAS_UNAVAILABLE, replica_msg, gen)
    else:
        degraded = _cond(ConditionType.DEGRADED, False, reason, "", gen)
    conditions = [
        _cond(ConditionType.READY, done, reason, message, gen),
        _cond(ConditionType.RECONCILING, reconciling, reason, message if reconciling else "", gen),
        _cond(ConditionType.STALLED, stall is not None, reason, message if stall is not None else "", gen),
        _cond(ConditionType.PROGRESSING, reconciling, reason, message if reconciling else "", gen),
        degraded,
    ]
    summary = "" if done and not failed else (message if not done else failed)
    if stall is not None and not serving:
        return DeploymentPhase.FAILED, conditions, summary
    if desired > 0 and not serving:
        return DeploymentPhase.PENDING, conditions, summary
    if degraded.status == "True":
        return DeploymentPhase.DEGRADED, conditions, summary
    return (DeploymentPhase.READY if done else DeploymentPhase.PROGRESSING), conditions, summary


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
    held = obs.invalid is not None or obs.refused is not None
    if held:
        adapters, adapters_ready = list(before.adapters), before.adapters_ready
    else:
        adapters = aggregate_adapters(obs.resolved, obs.replicas, before.adapters, now)
        adapters_ready = f"{sum(1 for a in adapters if a.state == 'Loaded')}/{obs.desired_adapters}"
    phase, conditions, message = _phase_and_conditions(obs, adapters, now)
    merged = merge_conditions(before.conditions, conditions, now)
    dep = obs.deployment
    return AdapterDeploymentStatus(
        phase=phase,
        # A refused apply leaves this generation unapplied: kstatus keeps reading InProgress, not Current.
        observed_generation=before.observed_generation if obs.refused is not None else obs.generation,
        conditions=merged,
        replicas=dep.replicas if dep else 0,
        ready_replicas=dep.ready_replicas if dep else 0,
        endpoint=obs.endpoint,
        adapters=adapters,
        adapters_ready=adapters_ready,
        message=message,
        selector=obs.selector or before.selector,
    )
