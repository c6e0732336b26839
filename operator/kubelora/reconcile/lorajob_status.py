"""From "where the run stands" to the four conditions, and from old to new status to a merge patch.

Conditions are derived, never accumulated: one :class:`Outcome` (phase + reason + message, plus
the pre-flight verdict) gives Validated, Running, Succeeded and Ready in one place, so they can
never disagree. A :class:`Drift` (the latest spec is invalid, or changes a running revision) only
overrides Validated (and Ready when the spec is invalid), which is what users and kstatus-based
tools such as Argo CD and Flux read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from kubelora.api.common import Condition, upsert_condition
from kubelora.api.lorajob import TERMINAL as TERMINAL
from kubelora.api.lorajob import LoRAJobStatus
from kubelora.api.reasons import ConditionType, JobPhase, Reason

CondStatus = Literal["True", "False", "Unknown"]
PREFLIGHT_REASONS = (Reason.INVALID_DATASET, Reason.BASE_MODEL_UNAVAILABLE, Reason.PREFLIGHT_FAILED,
                     Reason.INVALID_SPEC)
"""Reasons of a run that ended before training: Validated is False with the same reason."""
OWNED_FIELDS = frozenset(LoRAJobStatus.model_fields[name].alias or name
                         for name in LoRAJobStatus.model_fields) - {"progress"}
"""Top-level status keys the operator writes; ``progress`` belongs to the trainer."""
VALIDATION_PASSED_MESSAGE = "pre-flight passed"


@dataclass(frozen=True)
class Verdict:
    """The pre-flight verdict for the current revision (the Validated condition before any drift)."""

    status: CondStatus
    reason: Reason
    message: str


@dataclass(frozen=True)
class Outcome:
    """Where the current revision stands."""

    phase: JobPhase
    reason: Reason
    message: str
    validated: Verdict
    stalled: bool = False
    """Not finished, but stuck until the user acts (a pod that cannot pull its image)."""


@dataclass(frozen=True)
class Drift:
    """The latest spec differs from what the current revision trains."""

    reason: Literal[Reason.SPEC_IMMUTABLE, Reason.INVALID_SPEC]
    message: str


WORKING = (JobPhase.PENDING, JobPhase.VALIDATING, JobPhase.QUEUED, JobPhase.RUNNING)
Row = tuple[ConditionType, CondStatus, str, str]


def conditions(old: list[Condition], outcome: Outcome, drift: Drift | None, generation: int,
               now: str) -> list[Condition]:
    """Every condition for ``outcome``; times kept where a condition's status did not change.

    Ready/Reconciling/Stalled follow the contract in :mod:`kubelora.api.reasons` (what kstatus and
    the Argo CD health check read); Validated/Running/Succeeded say which step the run is in.
    """
    phase = outcome.phase
    running: CondStatus = "True" if phase == JobPhase.RUNNING else "False"
    succeeded: CondStatus = ("True" if phase == JobPhase.SUCCEEDED
                             else "False" if phase == JobPhase.FAILED else "Unknown")
    # Suspended is where the spec asks the run to be: Ready, so kstatus reads Current (it reads Ready=False
    # as InProgress) and a GitOps sync waiting on health does not hang on a paused run.
    ready: CondStatus = "True" if phase in (JobPhase.SUCCEEDED, JobPhase.SUSPENDED) else "False"
    stalled = phase == JobPhase.FAILED or outcome.stalled
    verdict = outcome.validated
    rows: list[Row] = [
        (ConditionType.VALIDATED, verdict.status, verdict.reason, verdict.message),
        (ConditionType.RUNNING, running, outcome.reason, outcome.message),
        (ConditionType.SUCCEEDED, succeeded, outcome.reason, outcome.message),
        (ConditionType.READY, ready, outcome.reason, outcome.message),
        (ConditionType.RECONCILING, _flag(phase in WORKING and not stalled), outcome.reason, outcome.message),
        (ConditionType.STALLED, _flag(stalled), outcome.reason, outcome.message),
    ]
    if drift is not None:
        rows[0] = (ConditionType.VALIDATED, "False", drift.reason, drift.message)
        if drift.reason == Reason.INVALID_SPEC:
            # The run goes on with the spec it started with, but this generation will never be applied.
            rows[3] = (ConditionType.READY, "False", drift.reason, drift.message)
            rows[4] = (ConditionType.RECONCILING, "False", drift.reason, drift.message)
            rows[5] = (ConditionType.STALLED, "True", drift.reason, drift.message)
    return _upsert(old, rows, generation, now)


def _flag(value: bool) -> CondStatus:
    return "True" if value else "False"


def _upsert(old: list[Condition], rows: list[Row], generation: int, now: str) -> list[Condition]:
    out = list(old)
    for ctype, cstatus, reason, message in rows:
        out = upsert_condition(out, Condition(type=ctype, status=cstatus, reason=reason, message=message,
                                              observed_generation=generation, last_transition_time=now))
    return out


def blocked_status(raw: Mapping[str, Any] | None, reason: Reason, message: str, now: str) -> dict[str, Any]:
    """The stored status with Stalled=True and Ready/Reconciling=False: the operator cannot act on the spec.

    Everything else stays as it was, ``observedGeneration`` included (the generation is not applied),
    since the action that failed never happened.
    """
    old = parse_status(raw)
    generation = old.observed_generation or 1
    rows: list[Row] = [(ConditionType.READY, "False", reason, message),
                       (ConditionType.RECONCILING, "False", reason, message),
                       (ConditionType.STALLED, "True", reason, message)]
    wire = old.model_copy(update={"message": message, "conditions": _upsert(old.conditions, rows, generation, now)})
    return wire.wire()


def condition(status: LoRAJobStatus, ctype: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == ctype), None)


def terminal_outcome(status: LoRAJobStatus) -> Outcome:
    """Rebuild the Outcome of a finished run from its stored Succeeded condition (runs never un-finish)."""
    done = condition(status, ConditionType.SUCCEEDED)
    reason = _reason(done.reason if done else "", Reason.COMPLETED if status.phase == JobPhase.SUCCEEDED
                     else Reason.TRAINING_FAILED)
    message = done.message if done and done.message else (status.message or "")
    if reason in PREFLIGHT_REASONS:
        verdict = Verdict("False", reason, message)
    else:
        passed = condition(status, ConditionType.VALIDATED)
        keep = passed is not None and passed.status == "True" and passed.reason == Reason.VALIDATION_PASSED
        verdict = Verdict("True", Reason.VALIDATION_PASSED,
                          passed.message if keep and passed else VALIDATION_PASSED_MESSAGE)
    return Outcome(JobPhase(status.phase), reason, message, verdict)


def _reason(value: str, default: Reason) -> Reason:
    try:
        return Reason(value)
    except ValueError:
        return default


def known_reason(value: str, allowed: tuple[Reason, ...], default: Reason) -> Reason:
    """A reason reported by the trainer if it is one we document for this place, else ``default``."""
    reason = _reason(value, default)
    return reason if reason in allowed else default


def parse_status(raw: Mapping[str, Any] | None) -> LoRAJobStatus:
    """The stored status, dropping fields that do not validate instead of failing the whole reconcile.

    ``progress`` is the trainer's and is never parsed here: a newer trainer may add fields.
    """
    data = {k: v for k, v in (raw or {}).items() if k in OWNED_FIELDS}
    try:
        return LoRAJobStatus.model_validate(data)
    except ValidationError:
        good: dict[str, Any] = {}
        for key, value in data.items():
            try:
                LoRAJobStatus.model_validate({key: value})
            except ValidationError:
                continue
            good[key] = value
        return LoRAJobStatus.model_validate(good)


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch turning ``old`` into ``new`` for the keys we own; empty when nothing changed."""
    old = old or {}
    patch: dict[str, Any] = {k: v for k, v in new.items() if k in OWNED_FIELDS and old.get(k) != v}
    patch.update({k: None for k in old if k in OWNED_FIELDS and k not in new})
    return patch
