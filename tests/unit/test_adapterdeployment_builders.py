"""Builders of an AdapterDeployment's children: engine command lines, pod template, ConfigMap, Service, RBAC."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import ADAPTER_CACHE_DIR, DESIRED_ADAPTERS_KEY, DesiredAdapter, DesiredAdapters
from kubelora.resources.serving_common import TEMPLATE_HASH_ANNOTATION, configmap_name, endpoint
from kubelora.resources.serving_configmap import adapters_configmap, desired_adapters
from kubelora.resources.serving_deployment import server_deployment
from kubelora.resources.serving_engine import ServingSpecError, engine_command
from kubelora.resources.serving_service import agent_role, agent_role_binding, agent_service_account, server_service

IMAGE = "ghcr.io/kubelora/server:0.1.0"
DIGEST = "sha256:" + "a" * 64


def make_body(**spec: Any) -> dict[str, Any]:
    base = {"baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "servedName": "qwen"}, "replicas": 2}
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "support", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": {**base, **spec},
    }


def parse(body: dict[str, Any]) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate(body["spec"])


def deployment(body: dict[str, Any], adapter_uris: list[str | None] | None = None) -> dict[str, Any]:
    return server_deployment(ObjectRef.of(body), parse(body), image=IMAGE, adapter_uris=adapter_uris or [])


def containers(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def template_hash(dep: dict[str, Any]) -> str:
    return str(dep["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION])


def test_vllm_command_line() -> None:
    body = make_body(
        vllm={
            "maxLoras": 2,
            "maxLoraRank": 16,
            "maxCpuLoras": 4,
            "maxModelLen": 4096,
            "gpuMemoryUtilization": 0.8,
            "extraArgs": ["--enforce-eager"],
        }
    )
    assert engine_command(parse(body)) == [
        "vllm",
        "serve",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--host",
        "$(POD_IP)",
        "--port",
        "8000",
        "--served-model-name",
        "qwen",
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
        "--max-cpu-loras",
        "4",
        "--middleware",
        "kubelora_server.lora_guard.PodLocalLoRAUpdates",
        "--max-model-len",
        "4096",
        "--gpu-memory-utilization",
        "0.8",
        "--enforce-eager",
    ]


@pytest.mark.parametrize(
    ("uri", "model", "extra"),
    [
        pytest.param("hf://Qwen/Qwen2.5-0.5B@v1.0", "Qwen/Qwen2.5-0.5B", ["--revision", "v1.0"], id="hf-revision"),
        pytest.param("pvc://models/qwen/0.5b", "/mnt/pvc/models/qwen/0.5b", [], id="pvc"),
        pytest.param("file:///data/tiny", "/data/tiny", [], id="file"),
    ],
)
def test_model_argument(uri: str, model: str, extra: list[str]) -> None:
    cmd = engine_command(parse(make_body(baseModel={"uri": uri, "servedName": "base"})))
    assert cmd[2] == model
    assert cmd[3 : 3 + len(extra)] == extra


def test_tensor_parallel_follows_gpus() -> None:
    cmd = engine_command(parse(make_body(resources={"gpus": 4})))
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"


def test_cpu_engine_command_line() -> None:
    cmd = engine_command(parse(make_body(engine="cpu", baseModel={"uri": "file:///models/tiny", "servedName": "tiny"})))
    assert cmd[:3] == ["kubelora-cpu-engine", "--model", "/models/tiny"]
    for flag, value in [
        ("--served-model-name", "tiny"),
        ("--host", "$(POD_IP)"),
        ("--port", "8000"),
        ("--max-loras", "4"),
        ("--max-lora-rank", "64"),
        ("--max-cpu-loras", "8"),
    ]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-lora" in cmd
    assert "--gpu-memory-utilization" not in cmd


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        pytest.param(
            {"baseModel": {"uri": "s3://models/qwen", "servedName": "q"}}, "hf://, pvc:// or file://", id="s3-base"
        ),
        pytest.param({"baseModel": {"uri": "https://example.com/m", "servedName": "q"}}, "pvc://", id="https-base"),
        pytest.param({"vllm": {"extraArgs": ["--port=9000"]}}, "--port is set by the operator", id="extra-port"),
        pytest.param({"vllm": {"extraArgs": ["--max-loras", "9"]}}, "--max-loras", id="extra-max-loras"),
    ],
)
def test_unservable_specs(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ServingSpecError, match=match):
        deployment(make_body(**spec))


def test_vllm_deployment_shape() -> None:
    body = make_body(
        baseModel={"uri": "hf://Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen", "credentialsSecretRef": "hf-token"},
        resources={"gpus": 1, "requests": {"memory": "32Gi"}, "nodeSelector": {"gpu": "a100"}},
    )
    dep = deployment(body)
    assert dep["metadata"]["name"] == "support"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert dep["spec"]["replicas"] == 2
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "support-agent"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["enableServiceLinks"] is False
    engine, agent = containers(dep)["engine"], containers(dep)["agent"]
    env = {e["name"]: e for e in engine["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert engine["resources"]["requests"]["memory"] == "32Gi"
    assert {p: engine[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "startupProbe": "/health",
        "readinessProbe": "/health",
        "livenessProbe": "/health",
    }
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "agent"}
    assert agent["command"][:3] == ["kubelora-agent", "--configmap", "support-adapters"]
    assert agent["command"][agent["command"].index("--engine-url") + 1] == "http://$(POD_IP):8000"
    assert "nvidia.com/gpu" not in json.dumps(agent["resources"])
    for c in (engine, agent):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert any(m["mountPath"] == ADAPTER_CACHE_DIR for m in c["volumeMounts"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["adapter-cache"] == {"name": "adapter-cache", "emptyDir": {}}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_cpu_deployment_has_no_gpu() -> None:
    dep = deployment(make_body(engine="cpu", baseModel={"uri": "pvc://models/tiny", "servedName": "tiny"}))
    assert "nvidia.com/gpu" not in json.dumps(dep)
    assert "dshm" not in json.dumps(dep)
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert containers(dep)["engine"]["command"][0] == "kubelora-cpu-engine"


def test_pvc_adapters_are_mounted_once_per_claim() -> None:
    dep = deployment(make_body(), ["pvc://adapters/a/rev-1", "pvc://adapters/b", "s3://bucket/c", None])
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in dep["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["adapters"]
    for c in containers(dep).values():
        assert {"name": "pvc-adapters", "mountPath": "/mnt/pvc/adapters", "readOnly": True} in c["volumeMounts"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param([], ["s3://bucket/legal"], id="add-s3-adapter"),
        pytest.param(
            ["pvc://adapters/a/rev-1"], ["pvc://adapters/a/rev-2", "pvc://adapters/b"], id="roll-forward-same-claim"
        ),
        pytest.param(["https://h.example/x", "file:///a"], [], id="remove-all"),
    ],
)
def test_template_hash_ignores_adapters(before: list[str | None], after: list[str | None]) -> None:
    """The promise that keeps pods running: changing adapters never changes the pod template."""
    body_before = make_body(adapters=[{"name": f"a{i}", "uri": u} for i, u in enumerate(before)])
    body_after = make_body(adapters=[{"name": f"b{i}", "uri": u, "digest": DIGEST} for i, u in enumerate(after)])
    dep_before, dep_after = deployment(body_before, before), deployment(body_after, after)
    assert template_hash(dep_before) == template_hash(dep_after)
    assert dep_before["spec"]["template"] == dep_after["spec"]["template"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"vllm": {"image": "ghcr.io/kubelora/server:0.2.0"}}, id="image"),
        pytest.param({"vllm": {"maxLoraRank": 16}}, id="max-lora-rank"),
        pytest.param({"baseModel": {"uri": "hf://Qwen/Other", "servedName": "qwen"}}, id="base-model"),
        pytest.param({"resources": {"gpus": 2}}, id="gpus"),
    ],
)
def test_template_hash_follows_pod_inputs(change: dict[str, Any]) -> None:
    body = make_body(**change)
    image = body["spec"].get("vllm", {}).get("image") or IMAGE
    changed = server_deployment(ObjectRef.of(body), parse(body), image=image)
    assert template_hash(changed) != template_hash(deployment(make_body()))


def test_new_pvc_claim_is_a_template_input() -> None:
    assert template_hash(deployment(make_body(), ["pvc://other/x"])) != template_hash(deployment(make_body()))


def test_configmap_holds_desired_adapters() -> None:
    body = make_body(vllm={"maxLoras": 2, "maxCpuLoras": 3, "maxLoraRank": 32})
    desired = desired_adapters(
        parse(body),
        [
            DesiredAdapter(name="legal", uri="s3://b/legal", digest=DIGEST),
            DesiredAdapter(name="support", uri="pvc://adapters/s/rev-1"),
        ],
    )
    cm = adapters_configmap(ObjectRef.of(body), desired)
    assert cm["metadata"]["name"] == configmap_name("support") == "support-adapters"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "AdapterDeployment"
    parsed = DesiredAdapters.model_validate_json(cm["data"][DESIRED_ADAPTERS_KEY])
    assert parsed == desired
    assert (parsed.base_model, parsed.served_name, parsed.max_loras, parsed.max_cpu_loras, parsed.max_lora_rank) == (
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "qwen",
        2,
        3,
        32,
    )
    assert adapters_configmap(ObjectRef.of(body), desired) == cm  # byte-stable: no churn on re-render


def test_service_and_endpoint() -> None:
    body = make_body(service={"type": "NodePort", "port": 9000})
    svc = server_service(ObjectRef.of(body), parse(body))
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": 8000, "protocol": "TCP"}]
    assert svc["spec"]["selector"] == deployment(body)["spec"]["selector"]["matchLabels"]
    assert endpoint(ObjectRef.of(body), 9000) == "http://support.ml.svc:9000/v1"


def test_agent_rbac_is_one_configmap() -> None:
    ref = ObjectRef.of(make_body())
    sa, role, binding = agent_service_account(ref), agent_role(ref), agent_role_binding(ref)
    assert sa["metadata"]["name"] == role["metadata"]["name"] == binding["metadata"]["name"] == "support-agent"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["support-adapters"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "support-agent", "namespace": "ml"}]
    assert binding["roleRef"]["name"] == "support-agent"
