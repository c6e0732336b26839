"""The lean kopf storages give exactly kopf's essences, only with fewer copies."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from kubelora.handlers.lorajob_kopf import LeanDiffBaseStorage, LeanProgressStorage, install

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "p",
        "namespace": "ml",
        "uid": "u",
        "resourceVersion": "7",
        "labels": {"kubelora.io/lorajob": "bot"},
        "annotations": {
            "kubelora.io/lorajob-name": "bot",
            "kubelora.io/last-handled-configuration": "{}",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        },
        "managedFields": [{"manager": "kcm", "fieldsV1": {"f:spec": {}}}],
    },
    "spec": {"containers": [{"name": "trainer", "image": "x"}], "volumes": []},
    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(POD, id="pod"),
        pytest.param({**POD, "metadata": {"name": "bare"}}, id="no-labels"),
        pytest.param(
            {
                **POD,
                "metadata": {
                    **POD["metadata"],
                    "annotations": {"kubelora.io/lorajob_changed": '{"started": "t"}', "kubelora.io/touch-dummy": "x"},
                },
            },
            id="progress-marks",
        ),
    ],
)
@pytest.mark.parametrize("extra", [pytest.param([], id="no-extra"), pytest.param([("status", "phase")], id="extra")])
def test_same_essence_as_kopf(body: dict[str, Any], extra: list[Any]) -> None:
    original = copy.deepcopy(body)
    raw = kopf.Body(body)  # type: ignore[arg-type]
    theirs = kopf.AnnotationsDiffBaseStorage(prefix="kubelora.io").build(body=raw, extra_fields=extra)
    ours = LeanDiffBaseStorage(prefix="kubelora.io").build(body=raw, extra_fields=extra)
    assert ours == theirs
    assert LeanProgressStorage(prefix="kubelora.io").clear(
        essence=copy.deepcopy(ours)
    ) == kopf.AnnotationsProgressStorage(prefix="kubelora.io").clear(essence=copy.deepcopy(theirs))
    assert body == original, "the event body must not be modified"


def test_install_keeps_configured_names_and_custom_storages() -> None:
    settings = kopf.OperatorSettings()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubelora.io", key="k")
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubelora.io")
    install(settings)
    diffbase, progress = settings.persistence.diffbase_storage, settings.persistence.progress_storage
    assert isinstance(diffbase, LeanDiffBaseStorage) and (diffbase.prefix, diffbase.key) == ("kubelora.io", "k")
    assert isinstance(progress, LeanProgressStorage) and progress.prefix == "kubelora.io"
    custom = kopf.StatusProgressStorage()
    settings.persistence.progress_storage = custom
    install(settings)
    assert settings.persistence.progress_storage is custom
