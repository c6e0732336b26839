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
        return AdapterDeploymentSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()]
        return None, "invalid spec: " + "; ".join(problems)


def status_patch(current: Mapping[str, Any] | None, new: AdapterDeploymentStatus) -> dict[str, Any] | None:
    """The merge patch that turns ``current`` into ``new``; None when they are equal (no write)."""
    target: dict[str, Any] = new.wire()
    current = dict(current or {})
    stale = {k: None for k in current if k not in target}
    if not stale and all(current.get(k) == v for k, v in target.items()):
        return None
    return {**target, **stale}
