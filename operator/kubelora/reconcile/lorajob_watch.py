"""The LossSpike condition: the trainer records a spiking training loss in ``status.progress.lossSpike``; the
operator turns it into a condition (abnormal-true, like Stalled) and one Warning Event.

Progress is reset when a new revision starts, so the condition describes the current revision only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubelora.api.common import Condition, upsert_condition
from kubelora.api.evaluation import LossSpike, spike_message
from kubelora.api.lorajob import LoRAJobStatus
from kubelora.api.reasons import ConditionType, Reason


def recorded_spike(progress: Mapping[str, Any] | None) -> LossSpike | None:
    raw = (progress or {}).get("lossSpike")
    if not isinstance(raw, Mapping):
        return None
    try:
        return LossSpike.model_validate(raw)
    except ValidationError:
        return None


def with_loss_spike(status: LoRAJobStatus, progress: Mapping[str, Any] | None, generation: int,
                    now: str) -> tuple[LoRAJobStatus, tuple[str, str] | None]:
    """``status`` with its LossSpike condition, and the Warning Event to post when it just turned True."""
    spike = recorded_spike(progress)
    before = next((c for c in status.conditions if c.type == ConditionType.LOSS_SPIKE), None)
    if spike is not None:
        cond = Condition(type=ConditionType.LOSS_SPIKE, status="True", reason=Reason.LOSS_SPIKED,
                         message=spike_message(spike), observed_generation=generation, last_transition_time=now)
    else:
        cond = Condition(type=ConditionType.LOSS_SPIKE, status="False", reason=Reason.LOSS_STEADY,
                         message=f"no loss spike in revision {status.revision} so far",
                         observed_generation=generation, last_transition_time=now)
    new = status.model_copy(update={"conditions": upsert_condition(status.conditions, cond)})
    turned = spike is not None and (before is None or before.status != "True")
    return new, ((Reason.LOSS_SPIKED, cond.message) if turned else None)


def spike_unreported(body: Mapping[str, Any]) -> bool:
    """The trainer recorded a spike the status has no True condition for (worth a reconcile now)."""
    status = body.get("status") or {}
    if recorded_spike(status.get("progress")) is None:
        return False
    return not any(c.get("type") == ConditionType.LOSS_SPIKE and c.get("status") == "True"
                   for c in status.get("conditions") or [])
