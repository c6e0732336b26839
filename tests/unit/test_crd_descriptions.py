"""``kubectl explain`` has something to say for every field: each property of the generated CRD schemas has a
description and a type (the descriptions come from the models' docstrings, so this guards the models)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = sorted((REPO / "crds").glob("*.yaml"))
UNTYPED_OK = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property below ``node`` with its dotted path (lists as ``[]``, maps as ``{}``)."""
    for name, child in (node.get("properties") or {}).items():
        yield f"{path}.{name}", child
        yield from properties(child, f"{path}.{name}")
        if isinstance(child.get("items"), dict):
            yield from properties(child["items"], f"{path}.{name}[]")
        if isinstance(child.get("additionalProperties"), dict):
            yield from properties(child["additionalProperties"], f"{path}.{name}{{}}")


def schema_properties(crd_path: Path) -> dict[str, dict[str, Any]]:
    crd = yaml.safe_load(crd_path.read_text())
    kind = crd["spec"]["names"]["kind"]
    return {path: node for version in crd["spec"]["versions"]
            for path, node in properties(version["schema"]["openAPIV3Schema"], kind)}


@pytest.mark.parametrize("crd_path", CRDS, ids=lambda p: p.name)
def test_every_property_has_a_description_and_a_type(crd_path: Path) -> None:
    found = schema_properties(crd_path)
    assert len(found) > 50
    # The root metadata is the API server's own: it refuses a CRD that says anything about it beyond
    # name/generateName, a description included, so kubectl explain shows the standard ObjectMeta text.
    root_metadata = [path for path in found if path.count(".") == 1 and path.endswith(".metadata")]
    assert [found[path] for path in root_metadata] == [{"type": "object"}]
    undocumented = [path for path, node in found.items()
                    if path not in root_metadata and not str(node.get("description", "")).strip()]
    untyped = [path for path, node in found.items() if "type" not in node and not any(k in node for k in UNTYPED_OK)]
    assert not undocumented, "no description (add a docstring under the field): " + ", ".join(undocumented)
    assert not untyped, "no type: " + ", ".join(untyped)


def test_the_fields_the_issue_named() -> None:
    lorajob = schema_properties(REPO / "crds/kubelora.io_lorajobs.yaml")
    deployment = schema_properties(REPO / "crds/kubelora.io_adapterdeployments.yaml")
    assert lorajob["LoRAJob.spec.training.maxSteps"]["type"] == "integer"
    assert "learning rate" in lorajob["LoRAJob.spec.training.learningRate"]["description"]
    assert "Passes over the training set" in lorajob["LoRAJob.spec.training.epochs"]["description"]
    assert "Serving pods" in deployment["AdapterDeployment.spec.replicas"]["description"]
