"""Generate the CustomResourceDefinitions (and the API reference) from the pydantic models.

    kubelora-crdgen            # rewrite crds/, charts/kubelora/crds/ and docs/api.md
    kubelora-crdgen --check    # exit 1 if any of them is out of date (CI)

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 subset: every node typed,
no ``$ref``, ``nullable`` instead of ``anyOf: [X, null]``, boolean ``exclusiveMinimum``, and no
``additionalProperties: false``. ``structural()`` does exactly that translation and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubelora.api.adapterdeployment import NAME_IS_A_SERVICE_NAME, AdapterDeploymentSpec, AdapterDeploymentStatus
from kubelora.api.cel import KEY, Rule
from kubelora.api.common import GROUP, VERSION
from kubelora.api.lorajob import LoRAJobSpec, LoRAJobStatus, training_fields_frozen

Schema = dict[str, Any]
REPO = Path(__file__).resolve().parents[3]
CRD_DIRS = (Path("crds"), Path("charts/kubelora/crds"))


def structural(node: Any, defs: dict[str, Schema]) -> Any:
    """Translate one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description/default win over the class docstring
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} structurally")
        inner = structural(options[0], defs)
        node = {**inner, **{k: v for k, v in node.items() if k != "default" or v is not None}, "nullable": True}
        if node.get("default", 0) is None:
            del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node.pop("title", None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if "enum" in node and "type" not in node:
        node["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    for key in ("properties",):
        if key in node:
            node[key] = {name: structural(sub, defs) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = structural(node[key], defs)
    if "properties" in node:
        node.setdefault("type", "object")
        required = set(node.get("required", []))
        for name, sub in node["properties"].items():
            # An empty default for optional sub-objects lets the API server fill in their defaults too,
            # so `kubectl get -o yaml` shows the effective spec.
            if name not in required and sub.get("type") == "object" and "default" not in sub \
                    and not sub.get("nullable") and "properties" in sub:
                sub["default"] = {}
    return node


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(raw, defs)  # type: ignore[no-any-return]


def _root_schema(kind_doc: str, spec: type[BaseModel], status: type[BaseModel],
                 rules: tuple[Rule, ...] = ()) -> Schema:
    return {
        **({KEY: [r.wire() for r in rules]} if rules else {}),
        "type": "object",
        "description": kind_doc,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubelora.io/v1alpha1."},
            "kind": {"type": "string", "description": "The kind of this object."},
            # No description here: the API server refuses anything but name/generateName under metadata.
            "metadata": {"type": "object"},
            "spec": model_schema(spec),
            "status": model_schema(status),
        },
    }


def _column(name: str, path: str, kind: str = "string", description: str = "", priority: int = 0) -> Schema:
    column: Schema = {"name": name, "type": kind, "jsonPath": path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority
    return column


def crd(kind: str, plural: str, short: str, doc: str, spec: type[BaseModel], status: type[BaseModel],
        columns: list[Schema], subresources: Schema | None = None, rules: tuple[Rule, ...] = ()) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kubelora"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["kubelora"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}, **(subresources or {})},
                "additionalPrinterColumns": [*columns, _column("Age", ".metadata.creationTimestamp", "date")],
                "schema": {"openAPIV3Schema": _root_schema(doc, spec, status, rules)},
            }],
        },
    }


SCALE = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
         "labelSelectorPath": ".status.selector"}
"""AdapterDeployment's scale subresource: `kubectl scale`, an HPA or KEDA write spec.replicas through it."""


def all_crds() -> dict[str, Schema]:
    """File name -> CRD, for both kinds."""
    return {
        f"{GROUP}_lorajobs.yaml": crd(
            "LoRAJob", "lorajobs", "lj", "LoRAJob fine-tunes a base model with QLoRA/LoRA and publishes the adapter.",
            LoRAJobSpec, LoRAJobStatus, [
                _column("Phase", ".status.phase"),
                _column("Progress", ".status.progress.percent", "integer", "percent of training steps done"),
                _column("Loss", ".status.progress.loss", "number"),
                _column("Adapter", ".status.adapter.uri", priority=1),
            ], rules=(training_fields_frozen(),)),
        f"{GROUP}_adapterdeployments.yaml": crd(
            "AdapterDeployment", "adapterdeployments", "ad",
            "AdapterDeployment serves a base model with vLLM multi-LoRA and attaches adapters at runtime.",
            AdapterDeploymentSpec, AdapterDeploymentStatus, [
                _column("Phase", ".status.phase"),
                _column("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
                _column("Adapters", ".status.adaptersReady", description="loaded/desired adapters"),
                _column("Replicas", ".status.readyReplicas", "integer", "ready replicas"),
                _column("Endpoint", ".status.endpoint", priority=1),
            ], subresources={"scale": SCALE}, rules=(NAME_IS_A_SERVICE_NAME,)),
    }


def render(document: Schema) -> str:
    header = "# Generated by kubelora-crdgen from operator/kubelora/api; do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=120)


def expected_files() -> dict[Path, str]:
    from kubelora.api.docgen import render_api_reference
    from kubelora.api.metrics import render_metrics_reference

    files = {d / name: render(doc) for d in CRD_DIRS for name, doc in all_crds().items()}
    files[Path("docs/api.md")] = render_api_reference()
    files[Path("docs/metrics.md")] = render_metrics_reference()
    files[TRAINER_POLICY_TEMPLATE] = render_trainer_policy_template()
    return files


TRAINER_POLICY_TEMPLATE = Path("charts/kubelora/templates/trainer-status-policy.yaml")
_NAME = "RELEASE-trainer-status"


def render_trainer_policy_template() -> str:
    """The chart's copy of :mod:`kubelora.api.trainer_policy`, named and labelled per release."""
    from kubelora.api.trainer_policy import binding, policy

    docs = [yaml.safe_dump(d, sort_keys=False, width=1000) for d in (policy(_NAME), binding(_NAME))]
    text = "---\n".join(docs)
    text = text.replace(f"name: {_NAME}\n", f"name: {_NAME}\n  labels: LABELS\n", 2)
    text = text.replace("RELEASE-", '{{ include "kubelora.fullname" . }}-')
    text = text.replace("labels: LABELS", 'labels: {{- include "kubelora.labels" . | nindent 4 }}')
    return "# Generated by kubelora-crdgen from operator/kubelora/api/trainer_policy.py; do not edit.\n" + text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubelora-crdgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if generated files are out of date")
    parser.add_argument("--root", type=Path, default=REPO)
    args = parser.parse_args(argv)
    stale = []
    for rel, text in expected_files().items():
        path = args.root / rel
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("out of date (run `make generate`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
