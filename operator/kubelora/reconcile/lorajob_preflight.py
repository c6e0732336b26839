"""The pre-flight Event: when pre-flight passes, the first training row as the trainer renders it (supervised
tokens between [[ and ]]) goes into a Normal Event, so ``kubectl describe lj`` shows what the model will be
taught before any GPU time is spent. The full rows are in the pre-flight pod's result and log."""

from __future__ import annotations

from kubelora.api.lorajob import LoRAJobStatus
from kubelora.api.reasons import ConditionType, Reason
from kubelora.reconcile.lorajob_observed import Observed
from kubelora.resources.lorajob_names import validation_job_name

EVENT_LIMIT = 1000
"""Characters of the Event message (the API server keeps about 1 KiB of an Event's note)."""


def _validated(status: LoRAJobStatus) -> bool:
    return any(c.type == ConditionType.VALIDATED and c.status == "True" for c in status.conditions)


def template_notice(observed: Observed, name: str, old: LoRAJobStatus, new: LoRAJobStatus) -> tuple[str, str] | None:
    """(reason, message) of the Normal Event for a pre-flight that just passed, when its result has rows."""
    if new.revision is None or (_validated(old) and old.revision == new.revision) or not _validated(new):
        return None
    pods = [p for p in observed.pods_of(validation_job_name(name, new.revision)) if p.phase == "Succeeded"]
    result = pods[-1].termination.result() if pods and pods[-1].termination is not None else None
    if result is None or result.validation is None or not result.validation.rendered:
        return None
    row = result.validation.rendered[0]
    text = row.text.replace("\n", "\\n")  # one line: kubectl describe shows Events one per line
    message = (f"{row.source} as trained ({row.tokens} tokens, {row.supervised} supervised, inside [[ ]]): {text}")
    return Reason.CHAT_TEMPLATE, message if len(message) <= EVENT_LIMIT else message[: EVENT_LIMIT - 1] + "…"
