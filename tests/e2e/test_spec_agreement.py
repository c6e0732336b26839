"""Property test on the real API server: for generated LoRAJob and AdapterDeployment specs, valid and invalid,
the pydantic models and the generated CRD (schema + CEL rules) agree.

Each example starts from a valid spec and overwrites one to three fields (chosen from the CRD's own schema)
with values of every JSON type, boundary numbers and URI-shaped strings, then:

* the model either accepts it or raises ``ValidationError``, never anything else;
* the API server (server-side dry run) either creates it or answers 422, never anything else;
* nothing the model accepts is refused by the API server (the CRD is never stricter than the operator);
* every refusal names a field: the API server's and the model's (as the operator reports it, ``spec.<path>``).

Specs the API server stores but the model refuses are allowed (the URI grammar beyond its pattern is the
operator's to check): the operator reports them as InvalidSpec with the same field name.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.common import ApiModel
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.reconcile.lorajob_object import pydantic_message
from kubelora_local.kube import KubeError

from .conftest import LocalCluster
from .test_lorajob import GROUP_PATH
from .test_lorajob import spec as lorajob_spec

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]
EXAMPLES = 400
TRIED: dict[str, dict[str, int]] = {}

URI_LIKE = ["pvc://data/chat.jsonl", "pvc://data/../x", "pvc://", "s3://bucket/key", "s3://b", "hf://org/model",
            "hf://org/model@main", "hf://datasets/org/ds", "https://example.com/a.jsonl", "http://insecure/a",
            "file:///etc/passwd", "oci://ghcr.io/org/adapter:1", "gs://bucket/x", "", " ", "a" * 300,
            "sha256:" + "a" * 64, "sha256:xyz", "all-linear", "q_proj,v_proj", "lora", "qlora", "Bad_Name", "ok-name"]
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2, 7, 8, 16, 64, 65, 1024, 1025, 2**31, 2**53]),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.999, 1.0, 1.5, -0.1, 1e30]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(URI_LIKE), st.text(max_size=40),
    st.lists(st.sampled_from(URI_LIKE), max_size=3), st.dictionaries(st.sampled_from(["uri", "x", "name"]),
                                                                    st.sampled_from(URI_LIKE), max_size=2),
)


def crd_spec_schema(plural: str) -> Obj:
    doc = yaml.safe_load((REPO / "crds" / f"kubelora.io_{plural}.yaml").read_text())
    schema: Obj = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def leaf_paths(schema: Obj, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every property path of the schema (objects too: replacing a whole object is a case of its own)."""
    for name, sub in (schema.get("properties") or {}).items():
        path = (*prefix, name)
        yield path
        if sub.get("type") == "object":
            yield from leaf_paths(sub, path)
        if sub.get("type") == "array" and (sub.get("items") or {}).get("type") == "object":
            yield from leaf_paths(sub["items"], (*path, "0"))


def put(target: Obj, path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` (``"0"`` indexes the first list item) to ``value``, making containers on the way."""
    node: Any = target
    for key, following in itertools.pairwise(path):
        child = [] if following == "0" else {}
        if isinstance(node, list):
            if not node or not isinstance(node[0], type(child)):
                node[:1] = [child]
            node = node[0]
            continue
        if not isinstance(node.get(key), type(child)):
            node[key] = child
        node = node[key]
    if isinstance(node, list):
        node[:1] = [value]
    else:
        node[path[-1]] = value


def ad_spec() -> Obj:
    return {"baseModel": {"uri": "pvc://models/tiny", "servedName": "tiny"},
            "adapters": [{"name": "support", "loraJobRef": {"name": "bot"}},
                         {"name": "legal", "uri": "s3://adapters/legal"}]}


def model_verdict(model: type[ApiModel], spec: Obj) -> str | None:
    """None when the model accepts, else the operator's message (ValidationError is the only way to refuse)."""
    try:
        model.from_wire(spec)
    except ValidationError as exc:
        return pydantic_message(exc)
    return None


def server_verdict(cluster: LocalCluster, namespace: str, kind: str, plural: str, spec: Obj) -> str | None:
    body = {"apiVersion": "kubelora.io/v1alpha1", "kind": kind, "metadata": {"name": "probe"}, "spec": spec}
    try:
        cluster.kube.request("POST", f"{GROUP_PATH}/{namespace}/{plural}", body, params={"dryRun": "All"})
    except KubeError as e:
        assert e.status == 422, f"the API server answered {e.status}, not 422: {e.body[:500]}"
        return str(json.loads(e.body)["message"])
    return None


CASES = {
    "lorajobs": ("LoRAJob", LoRAJobSpec, lambda: lorajob_spec("probe")),
    "adapterdeployments": ("AdapterDeployment", AdapterDeploymentSpec, ad_spec),
}


@pytest.mark.parametrize("plural", list(CASES))
def test_models_and_crd_agree(cluster: LocalCluster, namespace: str, plural: str) -> None:
    kind, model, valid = CASES[plural]
    paths = sorted(set(leaf_paths(crd_spec_schema(plural))))
    counts = TRIED.setdefault(plural, {"examples": 0, "refused_by_server": 0, "refused_by_model_only": 0})
    assert model_verdict(model, valid()) is None and server_verdict(cluster, namespace, kind, plural, valid()) is None

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(paths), VALUES), min_size=1, max_size=3))
    def agree(mutations: list[tuple[tuple[str, ...], Any]]) -> None:
        spec = copy.deepcopy(valid())
        for path, value in mutations:
            put(spec, path, value)
        by_model = model_verdict(model, spec)
        by_server = server_verdict(cluster, namespace, kind, plural, spec)
        counts["examples"] += 1
        where = [".".join(("spec", *p)) for p, _ in mutations]
        if by_model is None:
            assert by_server is None, f"the CRD refuses what the model accepts: {spec}\n{by_server}"
        else:
            assert any(f"spec.{p[0]}" in by_model or p[0] in by_model for p, _ in mutations), (by_model, mutations)
            counts["refused_by_model_only" if by_server is None else "refused_by_server"] += 1
        if by_server is not None:
            assert any(w.split(".")[0] + "." + w.split(".")[1] in by_server for w in where), (by_server, where)

    agree()
    print(f"{plural}: {counts}")
