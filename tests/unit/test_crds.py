"""The generated CRDs: up to date, structural, and accepting exactly what the models accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.crdgen import all_crds, expected_files
from kubelora.api.lorajob import LoRAJobSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))
MODELS = {"LoRAJob": LoRAJobSpec, "AdapterDeployment": AdapterDeploymentSpec}


@pytest.mark.parametrize("rel", [pytest.param(p, id=str(p)) for p in expected_files()])
def test_generated_files_are_up_to_date(rel: Path) -> None:
    committed = REPO / rel
    assert committed.exists(), f"{rel} is missing: run `make generate`"
    assert committed.read_text() == expected_files()[rel], f"{rel} drifted from the models: run `make generate`"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out += walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += walk(value, f"{path}[{i}]")
    return out


@pytest.mark.parametrize("name", list(all_crds()))
def test_schema_is_structural(name: str) -> None:
    schema = all_crds()[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"} & set(node), path
        if "properties" in node or "items" in node or "enum" in node:
            assert "type" in node, f"{path} has no type"
        assert node.get("additionalProperties", True) is not False, path


def test_crd_names_and_columns() -> None:
    lj, ad = all_crds().values()
    assert lj["spec"]["names"]["shortNames"] == ["lj"] and ad["spec"]["names"]["shortNames"] == ["ad"]
    assert lj["spec"]["names"]["categories"] == ["kubelora"]
    assert [c["name"] for c in lj["spec"]["versions"][0]["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Loss",
        "Adapter",
        "Age",
    ]
    assert [c["name"] for c in ad["spec"]["versions"][0]["additionalPrinterColumns"]][:4] == [
        "Phase",
        "Ready",
        "Adapters",
        "Replicas",
    ]
    assert lj["spec"]["versions"][0]["subresources"] == {"status": {}}


def to_draft4(node: Any) -> Any:
    """OpenAPI v3 `nullable: true` is `type: [t, null]` in JSON Schema draft 4."""
    if isinstance(node, list):
        return [to_draft4(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_draft4(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    crd = next(c for c in all_crds().values() if c["spec"]["names"]["kind"] == kind)
    return jsonschema.Draft4Validator(to_draft4(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))


def example_objects() -> list[Any]:
    params = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion", "").startswith("kubelora.io/"):
                params.append(pytest.param(doc, id=f"{path.relative_to(REPO)}:{doc['metadata']['name']}"))
    return params


@pytest.mark.parametrize("doc", example_objects())
def test_examples_validate_against_models_and_crds(doc: dict[str, Any]) -> None:
    crd_validator(doc["kind"]).validate(doc)
    MODELS[doc["kind"]].model_validate(doc["spec"])


def test_examples_cover_both_kinds_on_cpu_and_gpu() -> None:
    kinds = {
        (p.parent.name, d["kind"]) for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d and "kind" in d
    }
    for folder in ("cpu-quickstart", "gpu"):
        assert {(folder, "LoRAJob"), (folder, "AdapterDeployment")} <= kinds


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        pytest.param(
            "LoRAJob",
            {"baseModel": {"uri": "gs://x"}, "dataset": {"uri": "pvc://d/x"}, "output": {"uri": "pvc://a/x"}},
            id="lj-bad-scheme",
        ),
        pytest.param(
            "LoRAJob",
            {
                "baseModel": {"uri": "hf://a/b"},
                "dataset": {"uri": "pvc://d/x"},
                "output": {"uri": "pvc://a/x"},
                "lora": {"r": 0},
            },
            id="lj-rank",
        ),
        pytest.param(
            "AdapterDeployment",
            {"baseModel": {"uri": "hf://a/b", "servedName": "b"}, "vllm": {"maxLoraRank": 48}},
            id="ad-rank-bucket",
        ),
        pytest.param(
            "AdapterDeployment", {"baseModel": {"uri": "hf://a/b", "servedName": "b"}, "engine": "tgi"}, id="ad-engine"
        ),
    ],
)
def test_crd_schema_rejects_what_it_can(kind: str, spec: dict[str, Any]) -> None:
    doc = {"apiVersion": "kubelora.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(kind).validate(doc)


def api_models() -> list[type[Any]]:
    from kubelora.api import adapterdeployment, lorajob
    from kubelora.api.common import ApiModel

    return [m for mod in (lorajob, adapterdeployment) for m in vars(mod).values()
            if isinstance(m, type) and issubclass(m, ApiModel) and m.__module__ == mod.__name__]


@pytest.mark.parametrize("model", [pytest.param(m, id=m.__name__) for m in api_models()])
def test_every_cross_field_rule_has_a_cel_twin(model: type[Any]) -> None:
    """A model validator the CRD cannot see would let `kubectl apply` store a spec the operator then fails."""
    from kubelora.api.cel import KEY

    validators = model.__pydantic_decorators__.model_validators
    rules = (model.model_config.get("json_schema_extra") or {}).get(KEY, [])
    assert bool(validators) == bool(rules), f"{model.__name__}: {len(validators)} validators, {len(rules)} CEL rules"
    if rules:
        schema = model.model_json_schema(by_alias=True)
        assert schema[KEY] == rules  # reaches the generated CRD (test_generated_files_are_up_to_date)


def test_the_transition_rule_names_every_training_field() -> None:
    from kubelora.api.lorajob import TRAINING_FIELDS, training_fields_frozen

    crd = all_crds()["kubelora.io_lorajobs.yaml"]
    [root_rule] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert root_rule == training_fields_frozen().wire()
    for field in TRAINING_FIELDS:
        alias = LoRAJobSpec.model_fields[field].alias
        assert f"self.spec.{alias} == oldSelf.spec.{alias}" in root_rule["rule"]
