"""Cheaper drop-ins for two kopf storages that run on every watch event of every watched resource.

kopf computes an object's "essence" for each event, even for resources that only have
``on.event`` handlers and indexes (Jobs, Pods): it deep-copies the whole body -- ``managedFields``
and ``status`` included -- and then deletes those parts, and the progress storage deep-copies the
result once more to strip its annotations. With thousands of Jobs and Pods these copies were the
largest single cost of the operator (bench/RESULTS.md, "Operator scale").

The classes below produce the same essence (same keys, same values) without copying what is thrown
away: metadata other than labels/annotations, and status, unless a handler asked for extra fields,
in which case kopf's own code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

KEPT_METADATA = ("name", "namespace", "uid", "labels", "annotations")
"""labels/annotations are part of the essence; the identity fields are read to form storage keys."""


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        fields = list(extra_fields or [])
        if fields:
            return super().build(body=body, extra_fields=fields)
        meta = body.get("metadata") or {}
        slim: dict[str, Any] = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        slim["metadata"] = {k: meta[k] for k in KEPT_METADATA if k in meta}
        return super().build(body=kopf.Body(slim), extra_fields=fields)  # type: ignore[arg-type]


class LeanProgressStorage(kopf.AnnotationsProgressStorage):
    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """The essence is built afresh for each event, so with nothing to strip it is returned as is."""
        annotations = essence.get("metadata", {}).get("annotations", {})
        if any(key.startswith(f"{self.prefix}/") for key in annotations):
            return super().clear(essence=essence)
        self.remove_empty_stanzas(essence)
        return essence


def install(settings: kopf.OperatorSettings) -> None:
    """Swap in the lean storages, keeping the configured prefixes and keys; leave custom storages alone."""
    diffbase = settings.persistence.diffbase_storage
    if type(diffbase) is kopf.AnnotationsDiffBaseStorage:
        settings.persistence.diffbase_storage = LeanDiffBaseStorage(
            prefix=diffbase.prefix, key=diffbase.key, ignored_fields=diffbase.ignored_fields, v1=diffbase.v1)
    progress = settings.persistence.progress_storage
    if type(progress) is kopf.AnnotationsProgressStorage:
        settings.persistence.progress_storage = LeanProgressStorage(
            prefix=progress.prefix, verbose=progress.verbose, touch_key=progress.touch_key, v1=progress.v1)
