"""``extra`` for the operator's log records about one object, in the shape kopf's per-object loggers use.

``record.k8s_ref`` (an ObjectReference) and ``record.reason`` are what ``--log-format json`` writes as
``object`` and ``reason`` (``kubelora.__main__._JsonFormatter``). The records carry no ``settings``, so
kopf's Event poster, which only takes records from its own object loggers, never turns them into Events.
"""

from __future__ import annotations

from typing import Any

from kubelora.api.common import API_VERSION


def about(kind: str, namespace: str, name: str, reason: str = "") -> dict[str, Any]:
    extra: dict[str, Any] = {"k8s_ref": {"apiVersion": API_VERSION, "kind": kind, "namespace": namespace,
                                         "name": name}}
    if reason:
        extra["reason"] = reason
    return extra
