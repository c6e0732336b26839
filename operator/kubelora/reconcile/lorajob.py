"""Reconcile a LoRAJob: (object, observed children) -> (next status, actions). Pure; no API calls.

Phases::

    Pending -> Validating -> [Queued ->] Running -> Succeeded | Failed
                  |                       ^  |
                  v                       |  v
                Failed                 Suspended   (spec.suspend suspends the training Job, keeps
                                                    checkpoints; false resumes it from them)

Queued: the Job carries Kueue's queue label and waits suspended until Kueue admits it.

Which revision runs, and with which spec, is decided here:

* ``status.revision`` is the generation whose training fields (``LoRAJobSpec.training_fields()``)
  are being trained; its spec is frozen in the ConfigMap ``<job>-trainer-<revision>`` (``run_config``).
* Before training starts (and after the run ended), a change of training fields starts a new
  revision at the current generation. Once training started, the run keeps its spec; the change is
  reported as Validated=False/SpecImmutable and becomes a new run when the current one ends.
* A spec that fails the pydantic model (rules the CRD schema cannot express) is reported as
  InvalidSpec: a run that has not started ends Failed, a running one continues with its frozen spec.
  No exception escapes, so kopf never retries a spec that will never pass.

The same inputs give the same status and no actions, so repeated events are free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubelora.api.lorajob import LoRAJobSpec, LoRAJobStatus
from kubelora.api.reasons import JobPhase, Reason
from kubelora.api.runtime import TrainerRunConfig
from kubelora.reconcile.lorajob_actions import Action, Delete
from kubelora.reconcile.lorajob_object import LoRAJobObject, clip
from kubelora.reconcile.lorajob_observed import Observed
from kubelora.reconcile.lorajob_preflight import template_notice
from kubelora.reconcile.lorajob_promotion import gate_failure_event, with_promoted
from kubelora.reconcile.lorajob_run import RunInput, RunStep, advance
from kubelora.reconcile.lorajob_status import (
    TERMINAL,
    Drift,
    Outcome,
    Verdict,
    conditions,
    status_patch,
    terminal_outcome,
)
from kubelora.reconcile.lorajob_watch import spike_unreported, with_loss_spike
from kubelora.resources.lorajob_names import validation_job_name
from kubelora.settings import Settings


@dataclass(frozen=True)
class Plan:
    """The result of one reconcile."""

    status: dict[str, Any]
    """The desired status in wire form, without ``progress`` (the trainer's)."""
    patch: dict[str, Any]
    """Merge patch for the status subresource; empty when nothing changed."""
    actions: tuple[Action, ...] = ()
    old_phase: str | None = None
    requeue: bool = False
    """Reconcile again at once: a run just ended and a pending spec change starts the next one."""
    warnings: tuple[tuple[str, str], ...] = ()
    """(reason, message) of Warning Events to post once the status is written (a run that was not promoted)."""
    notices: tuple[tuple[str, str], ...] = ()
    """(reason, message) of Normal Events to post once the status is written (the rendered pre-flight row)."""

    @property
    def phase(self) -> str:
        return str(self.status["phase"])

    @property
    def message(self) -> str:
        return str(self.status.get("message", ""))

    @property
    def transitioned(self) -> bool:
        """The phase changed; an object without a status yet counts as Pending (the API default)."""
        return (self.old_phase or JobPhase.PENDING) != self.phase


def needs_reconcile(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether a LoRAJob watch event can change anything: the operator's replacement for kopf's
    create/update/resume causes, without kopf's per-event diff of the whole body.

    The first sight (``None`` when the operator starts: resume; ``ADDED``: create) always does; a
    modification only when the spec moved on (``generation`` ahead of ``status.observedGeneration``)
    or the status lost what the operator wrote. Status patches -- the operator's own and the
    trainer's progress -- change nothing. Deletion is left to garbage collection.
    """
    if event_type == "DELETED" or (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if event_type != "MODIFIED":
        return True
    status = body.get("status") or {}
    return bool(status.get("observedGeneration") != body["metadata"].get("generation") or not status.get("phase")
                or spike_unreported(body))


def training_changes(current: LoRAJobSpec, trained: LoRAJobSpec) -> list[str]:
    """Dotted manifest paths (``spec.training.learningRate``) of training fields that differ."""
    return _diff(trained.training_fields(), current.training_fields(), "spec")


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for key in sorted(set(old) | set(new)) for p in _diff(old.get(key), new.get(key), f"{path}.{key}")]
    return [] if old == new else [path]


def with_training_fields(current: LoRAJobSpec, trained: LoRAJobSpec) -> LoRAJobSpec:
    """The latest spec (resources, image, limits, suspend) with the training fields the run started with."""
    keys = set(trained.training_fields())
    names = [name for name, info in LoRAJobSpec.model_fields.items() if (info.alias or name) in keys]
    return current.model_copy(update={name: getattr(trained, name) for name in names})


def describe_changes(changes: list[str]) -> str:
    """The changed paths for a message: at most five, then a count."""
    return ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")


def _immutable_message(changes: list[str], revision: int) -> str:
    return (f"{describe_changes(changes)} changed after training of revision {revision} started; the run keeps "
            "the values it started with. The change starts a new run when this one ends; revert it to keep only this "
            "run, or delete and re-create the LoRAJob to start over now")


def reconcile(job: LoRAJobObject, observed: Observed, run_config: TrainerRunConfig | None,
              settings: Settings, now: str) -> Plan:
    """Compute the next status and the children to create or delete.

    ``run_config`` is the content of the current revision's ConfigMap when the caller has it (it is
    needed only when ``metadata.generation`` differs from ``status.revision``); ``now`` is RFC 3339.
    """
    generation = job.ref.generation
    observed = observed.owned_by(job.ref.uid)
    raw_status, progress, old, spec, invalid = job.stored_status, job.progress, job.status, job.spec, job.invalid

    have_config = run_config is not None and run_config.revision == old.revision
    trained = run_config.spec if have_config and run_config is not None else spec
    changes = training_changes(spec, trained) if spec is not None and trained is not None else []
    not_started = old.job_name is None and old.phase not in (JobPhase.RUNNING, *TERMINAL)
    status, actions, progress_patch = old, list[Action](), dict[str, Any]()
    if spec is not None and (old.revision is None or (changes and (old.phase in TERMINAL or not_started))):
        if old.revision is not None and not_started:
            actions.append(Delete("batch/v1", "Job", validation_job_name(job.ref.name, old.revision)))
        status = LoRAJobStatus(revision=generation, conditions=old.conditions,
                               last_succeeded_adapter=old.last_succeeded_adapter,
                               promoted_adapter=old.promoted_adapter)
        trained, changes = spec, []
        if progress is not None:
            progress_patch["progress"] = None

    drift: Drift | None = None
    step = RunStep(terminal_outcome(status)) if status.phase in TERMINAL else None
    if status.revision is None:
        message = f"invalid spec: {invalid}"
        step = RunStep(Outcome(JobPhase.FAILED, Reason.INVALID_SPEC, message,
                               Verdict("False", Reason.INVALID_SPEC, message)))
    elif spec is None:
        keeps = "" if step else f"; revision {status.revision} keeps running with the spec it started with"
        drift = Drift(Reason.INVALID_SPEC, f"invalid spec (generation {generation}): {invalid}{keeps}")
    elif changes:
        drift = Drift(Reason.SPEC_IMMUTABLE, clip(_immutable_message(changes, status.revision)))
    if step is None:
        assert status.revision is not None
        effective = with_training_fields(spec, trained) if spec and trained and changes else (spec or trained)
        step = advance(RunInput(
            job=job.ref, status=status, revision=status.revision, spec=effective, suspend=job.suspend,
            observed=observed, settings=settings, now=now, last_checkpoint=job.last_checkpoint,
            published=job.published))
    outcome = step.outcome
    new = status.model_copy(update={
        **step.updates, "phase": outcome.phase, "observed_generation": generation, "message": outcome.message,
        "conditions": conditions(status.conditions, outcome, drift, generation, now)})
    new = with_promoted(new, generation, now)
    new, spiked = with_loss_spike(new, None if "progress" in progress_patch else progress, generation, now)
    wire = new.wire()
    if outcome.phase == JobPhase.SUCCEEDED and progress is not None and progress.get("percent") != 100:
        progress_patch["progress"] = {"percent": 100}
    finished_now = outcome.phase in TERMINAL and old.phase not in TERMINAL
    not_promoted = gate_failure_event(new) if finished_now else None
    return Plan(status=wire, patch={**status_patch(raw_status, wire), **progress_patch},
                actions=(*actions, *step.actions), old_phase=raw_status.get("phase"),
                requeue=finished_now and bool(changes) and spec is not None,
                warnings=tuple(w for w in (not_promoted, spiked) if w),
                notices=tuple(n for n in (template_notice(observed, job.ref.name, old, new),) if n))
