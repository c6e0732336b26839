"""Admission checks: (old object, new object) -> an error message, or None to admit. Pure; no API calls.

The optional validating webhook (``handlers/admission.py``) asks these before an object is stored, so
``kubectl apply`` fails at once instead of the object ending Failed/InvalidSpec or carrying
Validated=False/SpecImmutable later. They reuse the reconciler's own rules and wording
(:func:`~kubelora.reconcile.lorajob.pydantic_message`, :func:`~kubelora.reconcile.lorajob.training_changes`),
so the webhook can never disagree with the operator; the reconciler stays the authority when the
webhook is off, down, or was enabled after an object was stored.

* Spec checks: the spec must pass the pydantic model (rules the CRD schema cannot express). An
  update that leaves the spec as it was is admitted, so status and metadata writes to an object
  stored before the webhook existed are never blocked.
* LoRAJob training fields (``LoRAJobSpec.training_fields()``) cannot change while a run is in
  progress (Validating, Running, Suspended). ``suspend``, resources, image and limits can. An object
  that already carries Validated=False/SpecImmutable (changed before the webhook was on) differs from
  its run in ways the webhook cannot see, so its updates are admitted to let the change be reverted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.reasons import ConditionType, JobPhase, Reason
from kubelora.reconcile.lorajob import describe_changes, pydantic_message, training_changes

Body = Mapping[str, Any]
IN_PROGRESS = frozenset({JobPhase.VALIDATING, JobPhase.RUNNING, JobPhase.SUSPENDED})


def spec_error(model: type[BaseModel], new: Body | None, old: Body | None = None) -> str | None:
    """``invalid spec: spec.lora.r: ...`` when ``new.spec`` fails ``model``; None when it passes or is unchanged."""
    if new is None:
        return None
    spec = new.get("spec") or {}
    if old is not None and (old.get("spec") or {}) == spec:
        return None
    try:
        model.model_validate(spec)
    except ValidationError as exc:
        return f"invalid spec: {pydantic_message(exc)}"
    return None


def lorajob_spec_error(new: Body | None, old: Body | None = None) -> str | None:
    return spec_error(LoRAJobSpec, new, old)


def adapterdeployment_spec_error(new: Body | None, old: Body | None = None) -> str | None:
    return spec_error(AdapterDeploymentSpec, new, old)


def lorajob_change_error(old: Body | None, new: Body | None) -> str | None:
    """A message naming the training fields changed while a run is in progress; None when admitted."""
    if old is None or new is None:
        return None
    status: Mapping[str, Any] = old.get("status") or {}
    phase = status.get("phase")
    if phase not in IN_PROGRESS or _has_spec_drift(status):
        return None
    try:
        before = LoRAJobSpec.model_validate(old.get("spec") or {})
        after = LoRAJobSpec.model_validate(new.get("spec") or {})
    except ValidationError:
        return None  # an invalid new spec is the spec check's to report; an invalid old one has no run fields
    changes = training_changes(after, before)
    if not changes:
        return None
    revision = status.get("revision")
    run = f"revision {revision}" if revision is not None else "the current run"
    return (f"{describe_changes(changes)} cannot change while {run} is {phase}: the run keeps the values it "
            "started with. Revert the change, apply it after the run ends (it then starts a new run), or "
            "delete and re-create the LoRAJob to start over now")


def _has_spec_drift(status: Mapping[str, Any]) -> bool:
    return any(isinstance(c, Mapping) and c.get("type") == ConditionType.VALIDATED
               and c.get("reason") == Reason.SPEC_IMMUTABLE for c in status.get("conditions") or [])
