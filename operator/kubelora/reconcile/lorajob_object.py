"""A LoRAJob as the reconciler reads it: parsed once, at the edge, from the body the watch delivered.

Everything past this point takes typed values. The spec may be invalid (stored before a rule existed,
or breaking a rule only the models know): then ``spec`` is None and ``invalid`` says why, so the
reconciler can report it instead of raising.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubelora.api.lorajob import AdapterInfo, LoRAJobSpec, LoRAJobStatus
from kubelora.api.meta import ObjectRef
from kubelora.reconcile.lorajob_status import parse_status

MESSAGE_LIMIT = 1024
"""Status messages are cut here: a log tail must not bloat every status patch."""


def clip(text: str) -> str:
    text = " ".join(text.split()) if "\n" in text else text.strip()
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def pydantic_message(exc: ValidationError) -> str:
    """One line per error, located by manifest path: ``spec.dataset: set either evalSplit or evalUri``."""
    lines = []
    for err in exc.errors():
        where = ".".join(["spec", *(str(p) for p in err["loc"])])
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def published_adapter(progress: Mapping[str, Any] | None) -> AdapterInfo | None:
    """The adapter the trainer recorded in ``status.progress`` (None if absent or malformed)."""
    raw = (progress or {}).get("adapter")
    if not isinstance(raw, Mapping):
        return None
    try:
        return AdapterInfo.model_validate(raw)
    except ValidationError:
        return None


@dataclass(frozen=True)
class LoRAJobObject:
    ref: ObjectRef
    spec: LoRAJobSpec | None
    """None when the stored spec fails the model; ``invalid`` then says why."""
    invalid: str
    suspend: bool
    """``spec.suspend`` as stored, readable even when the rest of the spec is invalid."""
    status: LoRAJobStatus
    """The operator's part of the stored status (fields that do not validate are dropped)."""
    stored_status: Mapping[str, Any]
    """The status as stored: status patches are computed against it."""
    progress: Mapping[str, Any] | None
    """``status.progress``, the trainer's; only the fields the operator reads are parsed from it."""

    @property
    def last_checkpoint(self) -> str | None:
        value = (self.progress or {}).get("lastCheckpoint")
        return str(value) if value else None

    @property
    def published(self) -> AdapterInfo | None:
        return published_adapter(self.progress)


def parse_lorajob(body: Mapping[str, Any]) -> LoRAJobObject:
    raw_spec = body.get("spec") or {}
    stored: Mapping[str, Any] = body.get("status") or {}
    try:
        spec: LoRAJobSpec | None = LoRAJobSpec.from_wire(raw_spec)
        invalid = ""
    except ValidationError as exc:
        spec, invalid = None, clip(pydantic_message(exc))
    progress = stored.get("progress")
    return LoRAJobObject(ref=ObjectRef.of(body), spec=spec, invalid=invalid, suspend=raw_spec.get("suspend") is True,
                         status=parse_status(stored), stored_status=stored,
                         progress=progress if isinstance(progress, Mapping) else None)
