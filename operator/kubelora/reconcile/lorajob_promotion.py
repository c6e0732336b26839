"""Promotion: which published adapter AdapterDeployments following a LoRAJob serve.

A run that ends Succeeded has published an adapter; it is *promoted* (``status.promotedAdapter``) only when
its evaluation meets ``spec.evaluation.gate`` (every adapter is promoted without a gate). The verdict is
taken once, when the run finishes, with the gate the run started with (``evaluation`` is a training field,
frozen while a run is in progress), and kept in ``status.evaluation``; the Promoted condition is derived from
it on every reconcile, so it can never disagree with the stored evaluation:

* Succeeded, gate met or no gate: Promoted=True (GatePassed / NoGate), promotedAdapter = adapter;
* Succeeded, gate missed: Promoted=False (GateFailed), promotedAdapter keeps the previous promoted one;
* still working: Promoted=Unknown (NotEvaluated); failed: Promoted=False (NotEvaluated).

A result without an evaluation (a lost termination message) is scored as "nothing measured": a gate then
fails, saying so, rather than promoting an adapter nobody measured.
"""

from __future__ import annotations

from typing import Any

from kubelora.api.common import Condition, upsert_condition
from kubelora.api.evaluation import EvaluationResult, from_metrics, with_gate
from kubelora.api.lorajob import AdapterInfo, LoRAJobSpec, LoRAJobStatus
from kubelora.api.reasons import ConditionType, JobPhase, Reason
from kubelora.api.runtime import TrainerResult


def evaluation_of(result: TrainerResult | None, spec: LoRAJobSpec | None) -> EvaluationResult | None:
    """The run's evaluation with the verdict of the gate it ran with; None when nothing was measured and no
    gate asks for anything."""
    evaluation = None
    if result is not None:
        evaluation = result.evaluation or from_metrics(result.metrics)
    gate = spec.evaluation.gate if spec is not None else None
    if evaluation is None and gate is None:
        return None
    return with_gate(gate, evaluation or EvaluationResult(message="the trainer reported no evaluation"))


def promotion_updates(adapter: AdapterInfo, result: TrainerResult | None, spec: LoRAJobSpec | None) -> dict[str, Any]:
    """Status updates of a run that published ``adapter``: its evaluation, and promotedAdapter if it passed."""
    evaluation = evaluation_of(result, spec)
    updates: dict[str, Any] = {"evaluation": evaluation}
    if evaluation is None or evaluation.gate_passed is not False:
        updates["promoted_adapter"] = adapter
    return updates


def promoted(status: LoRAJobStatus) -> tuple[str, Reason, str]:
    """(status, reason, message) of the Promoted condition for ``status``."""
    kept = status.promoted_adapter
    serving = (f"; serving stays on {kept.uri} ({kept.digest})" if kept
               else "; no adapter of this LoRAJob is promoted yet")
    if status.phase == JobPhase.SUCCEEDED:
        evaluation = status.evaluation
        if evaluation is not None and evaluation.gate_passed is False:
            return "False", Reason.GATE_FAILED, (f"revision {status.revision} missed spec.evaluation.gate: "
                                                 f"{evaluation.gate_message}{serving}")
        where = status.adapter.uri if status.adapter else "its adapter"
        if evaluation is not None and evaluation.gate_passed:
            return "True", Reason.GATE_PASSED, f"{where} passed spec.evaluation.gate: {evaluation.gate_message}"
        return "True", Reason.NO_GATE, f"{where} is promoted (spec.evaluation has no gate)"
    if status.phase == JobPhase.FAILED:
        return "False", Reason.NOT_EVALUATED, f"revision {status.revision} failed: nothing to promote{serving}"
    return "Unknown", Reason.NOT_EVALUATED, f"revision {status.revision} is not evaluated yet{serving}"


def with_promoted(status: LoRAJobStatus, generation: int, now: str) -> LoRAJobStatus:
    """``status`` with its Promoted condition, and promotedAdapter set for an adapter stored before promotion
    existed (Succeeded, no evaluation, no gate verdict: it was what deployments served)."""
    cstatus, reason, message = promoted(status)
    update: dict[str, Any] = {"conditions": upsert_condition(status.conditions, Condition(
        type=ConditionType.PROMOTED, status=cstatus, reason=reason, message=message,
        observed_generation=generation, last_transition_time=now))}
    if cstatus == "True" and status.adapter is not None and status.promoted_adapter != status.adapter:
        update["promoted_adapter"] = status.adapter
    return status.model_copy(update=update)


def gate_failure_event(status: LoRAJobStatus) -> tuple[Reason, str] | None:
    """The Warning Event of a run that finished without promotion (the caller posts it on the transition)."""
    cstatus, reason, message = promoted(status)
    return (reason, message) if status.phase == JobPhase.SUCCEEDED and cstatus == "False" else None
