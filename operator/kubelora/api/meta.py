"""The identity of a LoRAJob or AdapterDeployment, parsed once from the object the watch delivered.

Builders and reconcilers take an :class:`ObjectRef` (and the typed spec) instead of the raw body, so
what they may depend on is written down here and checked once at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from kubelora.api.common import API_VERSION


class ObjectRef(BaseModel):
    """apiVersion, kind, name, namespace, uid and generation of one object."""

    model_config = ConfigDict(frozen=True)

    api_version: str = API_VERSION
    kind: str
    name: str
    namespace: str
    uid: str = ""
    generation: int = 1

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ObjectRef:
        meta = body.get("metadata") or {}
        return cls(api_version=str(body.get("apiVersion") or API_VERSION), kind=str(body["kind"]),
                   name=str(meta["name"]), namespace=str(meta.get("namespace") or ""), uid=str(meta.get("uid") or ""),
                   generation=int(meta.get("generation") or 1))

    def owner_reference(self) -> dict[str, Any]:
        """The controller reference that makes garbage collection remove children with their owner."""
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def event_body(self) -> dict[str, Any]:
        """The least of the object kopf needs to post an Event about it."""
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}
