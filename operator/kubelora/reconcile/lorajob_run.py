"""One step of an unfinished run: pre-flight, then training, suspended or not.

Given what is observed, :func:`advance` says where the run stands (an :class:`Outcome`), which
status fields change and which children to create or delete. It never looks at spec drift or
revisions: :mod:`kubelora.reconcile.lorajob` decides which revision runs and with which spec.

Children are created in dependency order (identity, config, Job); every create is idempotent,
so repeating a step after a crash or an index lag costs a 409 and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubelora.api.lorajob import AdapterInfo, LoRAJobSpec, LoRAJobStatus
from kubelora.api.meta import ObjectRef
from kubelora.api.reasons import ConditionType, JobPhase, Reason
from kubelora.api.runtime import TrainerResult
from kubelora.api.uris import is_within
from kubelora.reconcile.lorajob_actions import Action, Create, Delete, Suspend
from kubelora.reconcile.lorajob_inputs import combine_inputs, input_uris, waiting_for
from kubelora.reconcile.lorajob_object import clip
from kubelora.reconcile.lorajob_observed import JobState, Observed, PodState
from kubelora.reconcile.lorajob_promotion import promotion_updates
from kubelora.reconcile.lorajob_status import (
    PREFLIGHT_REASONS,
    VALIDATION_PASSED_MESSAGE,
    Outcome,
    Verdict,
    condition,
    known_reason,
)
from kubelora.resources.lorajob_config import trainer_config_map, trainer_identity
from kubelora.resources.lorajob_jobs import rendezvous_service, training_job, validation_job
from kubelora.resources.lorajob_names import training_job_name, validation_job_name
from kubelora.settings import Settings


@dataclass(frozen=True)
class RunInput:
    job: ObjectRef
    status: LoRAJobStatus
    revision: int
    spec: LoRAJobSpec | None
    """Spec that builds children; None when the latest spec is invalid and the revision's is unknown."""
    suspend: bool
    observed: Observed
    settings: Settings
    now: str
    last_checkpoint: str | None = None
    published: AdapterInfo | None = None
    """``status.progress.adapter``: what the trainer reported publishing, should its pod be gone."""


@dataclass
class RunStep:
    outcome: Outcome
    updates: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)


def preflight_message(vname: str) -> str:
    """The same words when the Job is created and while it runs: no status write in between."""
    return f"pre-flight Job {vname} is checking the dataset and the base model"


def _detail(pod: PodState | None, result: TrainerResult | None) -> str:
    """The best human explanation of a failed pod: the trainer's message, its log tail, or the exit code."""
    if result is not None and result.message:
        return result.message
    if pod is None or pod.termination is None:
        return ""
    term = pod.termination
    return term.message or f"container exited with code {term.exit_code}" + (f" ({term.reason})" if term.reason
                                                                                else "")


def _last(pods: list[PodState], phase: str) -> PodState | None:
    return next((p for p in reversed(pods) if p.phase == phase), None)


def _result(pod: PodState | None) -> TrainerResult | None:
    return pod.termination.result() if pod is not None and pod.termination is not None else None


def _validation(run: RunInput) -> Verdict | Outcome | list[Action]:
    """The pre-flight verdict, the failed Outcome, or the creates that start pre-flight."""
    name = run.job.name
    vname = validation_job_name(name, run.revision)
    old = condition(run.status, ConditionType.VALIDATED)
    if run.status.job_name is not None or run.status.phase == JobPhase.RUNNING:
        message = old.message if old and old.reason == Reason.VALIDATION_PASSED else VALIDATION_PASSED_MESSAGE
        return Verdict("True", Reason.VALIDATION_PASSED, message)
    vjob = run.observed.job(vname)
    if vjob is None:
        if run.spec is None:
            return []
        inputs, missing = combine_inputs(run.spec, run.job.namespace, run.observed)
        if missing:
            return Verdict("Unknown", Reason.WAITING_FOR_INPUTS, waiting_for(missing))
        return [Create(trainer_config_map(run.job, run.revision, run.spec, inputs)),
                Create(validation_job(run.job, run.spec, run.revision, run.settings, inputs=input_uris(inputs)))]
    pods = run.observed.pods_of(vname)
    failed, passed = _last(pods, "Failed"), _last(pods, "Succeeded")
    result = _result(failed or passed)
    if failed is not None or vjob.failed_reason is not None or (result is not None and not result.ok):
        reason = known_reason(result.reason if result else "", PREFLIGHT_REASONS, Reason.PREFLIGHT_FAILED)
        detail = _detail(failed or passed, result) or vjob.failed_message or "the pre-flight pod failed"
        message = clip(f"pre-flight failed: {detail}")
        return Outcome(JobPhase.FAILED, reason, message, Verdict("False", reason, message))
    if passed is not None or vjob.complete:
        message = old.message if old and old.reason == Reason.VALIDATION_PASSED else VALIDATION_PASSED_MESSAGE
        if result is not None and result.validation is not None:
            v = result.validation
            message = f"{VALIDATION_PASSED_MESSAGE}: {v.train_rows} train rows, {v.eval_rows} eval rows ({v.format})"
        return Verdict("True", Reason.VALIDATION_PASSED, message)
    return Verdict("Unknown", Reason.VALIDATING, preflight_message(vname))


def _finished(run: RunInput, job: JobState, verdict: Verdict) -> RunStep:
    """Outcome of a training Job the Job controller has finished."""
    pods = run.observed.pods_of(job.name)
    updates: dict[str, Any] = {"completion_time": job.completion_time or run.now,
                               "attempts": _attempts(run, job, pods)}
    if job.complete:
        pod = _last(pods, "Succeeded")
        result = _result(pod)
        adapter = result.adapter if result is not None and result.ok and result.adapter is not None else run.published
        if adapter is not None and run.spec is not None and not is_within(adapter.uri, run.spec.output.uri):
            message = clip(f"the trainer reported an adapter at {adapter.uri}, outside spec.output.uri "
                           f"{run.spec.output.uri}: not published")
            return RunStep(Outcome(JobPhase.FAILED, Reason.ADAPTER_OUTSIDE_OUTPUT, message, verdict), updates)
        if adapter is not None:
            updates.update(promotion_updates(adapter, result, run.spec))
            updates["adapter"] = adapter
            updates["last_succeeded_adapter"] = adapter
            merged = result.merged if result is not None and result.ok else None
            if merged is not None and run.spec is not None and is_within(merged.uri, run.spec.output.uri):
                updates["merged"] = merged
            message = f"adapter published at {adapter.uri} ({adapter.digest})"
            return RunStep(Outcome(JobPhase.SUCCEEDED, Reason.COMPLETED, message, verdict), updates)
        detail = _detail(pod, result) or "the trainer reported no result"
        message = clip(f"training Job {job.name} completed without a published adapter: {detail}")
        return RunStep(Outcome(JobPhase.FAILED, Reason.TRAINING_FAILED, message, verdict), updates)
    pod = _last(pods, "Failed")
    detail = _detail(pod, _result(pod)) or job.failed_message
    if job.failed_reason == "PodFailurePolicy":
        # The trainer exited 2: bad input, which no retry fixes; the Job controller failed the Job at once.
        result = _result(pod)
        prefix = f"{result.reason}: " if result is not None and result.reason else ""
        message = clip(f"{prefix}{detail}" if detail else "the trainer reported bad input")
        return RunStep(Outcome(JobPhase.FAILED, Reason.TRAINING_FAILED, message, verdict), updates)
    if job.failed_reason == "DeadlineExceeded":
        limit = run.spec.active_deadline_seconds if run.spec else None
        message = f"activeDeadlineSeconds ({limit}) elapsed" if limit else "activeDeadlineSeconds elapsed"
        reason = Reason.DEADLINE_EXCEEDED
    else:
        message = f"all {updates['attempts']} attempts failed"
        reason = Reason.BACKOFF_LIMIT_EXCEEDED
    message = clip(f"{message}; last error: {detail}" if detail else message)
    return RunStep(Outcome(JobPhase.FAILED, reason, message, verdict), updates)


def _attempts(run: RunInput, job: JobState, pods: list[PodState]) -> int:
    """Attempts of this Job, the one in progress included (so its pod appearing costs no status write).

    Never decreases while the Job stays the same, although deleted pods vanish from view.
    """
    stored = run.status.attempts if run.status.job_name == job.name else 0
    nodes = run.spec.resources.nodes if run.spec else 1
    # A multi-node attempt is one pod per node: count groups, not pods.
    return max(stored, -(-(job.active + job.failed + job.succeeded) // nodes), -(-len(pods) // nodes), 1)


def _running(run: RunInput, job: JobState, verdict: Verdict) -> RunStep:
    pods = run.observed.pods_of(job.name)
    attempts = _attempts(run, job, pods)
    updates: dict[str, Any] = {"job_name": job.name, "attempts": attempts,
                               "start_time": run.status.start_time or run.now}
    if job.suspended and not run.suspend:
        if job.queued:
            queue = run.spec.queue_name if run.spec and run.spec.queue_name else "its LocalQueue"
            message = f"training Job {job.name} waits in Kueue queue {queue} until its ClusterQueue has quota"
            return RunStep(Outcome(JobPhase.QUEUED, Reason.QUEUED, message, verdict), updates)
        message = f"resuming training Job {job.name}; the new pod resumes from the newest checkpoint"
        return RunStep(Outcome(JobPhase.RUNNING, Reason.JOB_CREATED, message, verdict), updates,
                       [Suspend(job.name, False)])
    limit = (run.spec.backoff_limit + 1) if run.spec else None
    of = f" of {limit}" if limit else ""
    if any(p.phase == "Running" for p in pods):
        message = f"training (attempt {attempts}{of})"
        return RunStep(Outcome(JobPhase.RUNNING, Reason.TRAINING, message, verdict), updates)
    blocked = next((p for p in reversed(pods) if p.blocker is not None and not p.done and not p.deleting), None)
    if blocked is not None and blocked.blocker is not None:
        b = blocked.blocker
        fix = ("; fix spec.image, its pull secret or the Secret/ConfigMap it names" if b.stalled
               else "; free capacity or change spec.resources")
        message = clip(f"pod {blocked.name} cannot start: {b.reason}: {b.message}{fix}")
        reason = Reason.POD_BLOCKED if b.stalled else Reason.UNSCHEDULABLE
        return RunStep(Outcome(JobPhase.RUNNING, reason, message, verdict, stalled=b.stalled), updates)
    if attempts > 1:
        message = f"retrying (attempt {attempts}{of}); the new pod resumes from the newest checkpoint"
    else:
        message = f"training Job {job.name} created; waiting for its pod to start"
    return RunStep(Outcome(JobPhase.RUNNING, Reason.JOB_CREATED, message, verdict), updates)


def _current_job(run: RunInput) -> JobState | None:
    """The Job named in status, or a live one of this revision whose name never reached the status."""
    named = run.observed.job(run.status.job_name)
    if named is not None and not named.deleting:
        return named
    live = [j for j in run.observed.training_jobs(run.revision) if j.live]
    return live[-1] if live else named


def _start_training(run: RunInput, verdict: Verdict) -> RunStep:
    """Create a training Job (first start, or resume after suspend) unless an old pod still runs."""
    generation = run.job.generation
    name = training_job_name(run.job.name, generation)
    phase = JobPhase.SUSPENDED if run.status.phase == JobPhase.SUSPENDED else JobPhase.RUNNING
    waiting = run.observed.live_training_pods(run.revision)
    if waiting or run.observed.job(name) is not None:
        what = f"pod {waiting[0].name}" if waiting else f"Job {name}"
        message = f"waiting for {what} of the previous run to stop before starting training"
        return RunStep(Outcome(phase, Reason.SUSPENDED if phase == JobPhase.SUSPENDED else Reason.JOB_CREATED,
                               message, verdict))
    if run.spec is None:
        return RunStep(Outcome(phase, Reason.JOB_CREATED, "waiting for a valid spec to start training", verdict))
    actions: list[Action] = [Create(m) for m in trainer_identity(run.job)]
    inputs, _ = combine_inputs(run.spec, run.job.namespace, run.observed)
    if run.observed.job(validation_job_name(run.job.name, run.revision)) is None:
        # The ConfigMap was created before the pre-flight Job; re-create it only if that is gone too.
        actions.append(Create(trainer_config_map(run.job, run.revision, run.spec, inputs)))
    if run.spec.resources.nodes > 1:
        # The pods' DNS names must exist before they start: node 0's name is every node's rendezvous.
        actions.append(Create(rendezvous_service(run.job, run.revision, generation)))
    actions.append(Create(training_job(run.job, run.spec, run.revision, generation, run.settings,
                                       inputs=input_uris(inputs))))
    updates = {"job_name": name, "attempts": 1, "start_time": run.status.start_time or run.now,
               "completion_time": None}
    message = f"training Job {name} created; waiting for its pod to start"  # as _running says: no rewrite
    return RunStep(Outcome(JobPhase.RUNNING, Reason.JOB_CREATED, message, verdict), updates, actions)


def _suspend(run: RunInput, verdict: Verdict) -> RunStep:
    """Suspend the Job (its controller stops the pod, which saves a checkpoint on SIGTERM).

    A Job queued in Kueue is deleted instead: its ``spec.suspend`` is Kueue's to set, and a new
    Job queues again on resume.
    """
    live = [j for j in run.observed.training_jobs(run.revision) if j.live]
    actions: list[Action] = [Delete("batch/v1", "Job", j.name) if j.queued else Suspend(j.name, True)
                             for j in live if j.queued or not j.suspended]
    checkpoint = f" (last checkpoint: {run.last_checkpoint})" if run.last_checkpoint else ""
    message = f"suspended; checkpoints are kept{checkpoint}. Set spec.suspend to false to resume"
    return RunStep(Outcome(JobPhase.SUSPENDED, Reason.SUSPENDED, message, verdict), actions=actions)


def advance(run: RunInput) -> RunStep:
    """The next step of an unfinished run."""
    name = run.job.name
    vname = validation_job_name(name, run.revision)
    checked = _validation(run)
    if isinstance(checked, Outcome):
        return RunStep(checked, {"validation_job_name": vname, "completion_time": run.now})
    if isinstance(checked, list):
        message = preflight_message(vname) if checked else "waiting for a valid spec to start pre-flight"
        verdict = Verdict("Unknown", Reason.VALIDATING, message)
        phase, reason = ((JobPhase.SUSPENDED, Reason.SUSPENDED) if run.suspend
                         else (JobPhase.VALIDATING, Reason.VALIDATING))
        return RunStep(Outcome(phase, reason, message, verdict),
                       {"validation_job_name": vname} if checked else {}, checked)
    verdict = checked
    updates: dict[str, Any] = {"validation_job_name": vname}
    if verdict.status != "True":
        phase, reason = ((JobPhase.SUSPENDED, Reason.SUSPENDED) if run.suspend
                         else (JobPhase.VALIDATING, Reason.VALIDATING))
        return RunStep(Outcome(phase, reason, verdict.message, verdict), updates)
    job = _current_job(run)
    if job is not None and job.finished:
        step = _finished(run, job, verdict)
    elif run.suspend:
        step = _suspend(run, verdict)
        if job is not None and job.live and not job.queued:
            step.updates = {"job_name": job.name}
    elif job is not None and job.live:
        step = _running(run, job, verdict)
    elif run.status.job_name is not None and run.status.phase == JobPhase.RUNNING:
        message = f"training Job {run.status.job_name} disappeared before it finished"
        step = RunStep(Outcome(JobPhase.FAILED, Reason.JOB_REMOVED, message, verdict), {"completion_time": run.now})
    else:
        step = _start_training(run, verdict)
    step.updates = {**updates, **step.updates}
    return step


__all__ = ["RunInput", "RunStep", "advance"]
