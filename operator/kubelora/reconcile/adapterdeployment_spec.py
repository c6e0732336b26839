"""Spec parsing and the status write decision, kept pure so both are unit-tested without kopf.

``parse_spec`` turns pydantic's errors into one readable InvalidSpec message (rules the CRD schema cannot
express, such as unique adapter names, end up here). ``status_patch`` is what keeps the timer from writing at
steady state: it returns None unless the freshly aggregated status differs from the stored one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus


def parse_spec(body: Mapping[str, Any]) -> tuple[AdapterDeploymentSpec | None, str | None]:
    """The typed spec, or why it is invalid (rules the CRD schema could not express)."""
    try:
        return AdapterDeploymentSpec.from_wire(body.get("spec") or {}), None
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()]
        return None, "invalid spec: " + "; ".join(problems)


def prune_empty(value: Any) -> Any:
    """Drop empty strings and nulls, recursively.

    Both sides of the comparison are pruned so that a server filling schema defaults (``message: ""``)
    does not look like a change, and the patch never sends ``""`` for a field that is simply unset.
    """
    if isinstance(value, Mapping):
        return {k: prune_empty(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [prune_empty(v) for v in value]
    return value


def status_patch(current: Mapping[str, Any] | None, new: AdapterDeploymentStatus) -> dict[str, Any] | None:
    """The merge patch that turns ``current`` into ``new``; None when they are equal (no write)."""
    target: dict[str, Any] = prune_empty(new.wire())
    before: dict[str, Any] = prune_empty(dict(current or {}))
    if before == target:
        return None
    return {**target, **{k: None for k in before if k not in target}}
