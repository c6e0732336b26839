"""What a reconcile asks the handlers to do: create, delete, suspend or resume a child. Plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Create:
    """Create ``manifest`` in the LoRAJob's namespace; an existing object of that name is fine (409)."""

    manifest: Manifest

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    def __str__(self) -> str:
        return f"create {self.kind}/{self.name}"


@dataclass(frozen=True)
class Delete:
    """Delete a child in the LoRAJob's namespace, foreground, so its pods are gone before it is."""

    api_version: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"delete {self.kind}/{self.name}"


@dataclass(frozen=True)
class Suspend:
    """Set ``spec.suspend`` of a Job: the Job controller stops (true) or starts (false) its pods."""

    name: str
    suspend: bool
    kind: str = "Job"

    def __str__(self) -> str:
        return f"{'suspend' if self.suspend else 'resume'} Job/{self.name}"


Action = Create | Delete | Suspend
