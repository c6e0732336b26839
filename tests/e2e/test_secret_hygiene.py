"""Credentials stay in their Secret (issue 14): after a run that needs them, none of their values appears in
anything the operator, the trainer or the server write.

One LoRAJob reads its dataset from and publishes to S3 (a moto server on the node's address, reached from the
pods over the pod network) with the access keys in a Secret; an AdapterDeployment whose agent holds the same
Secret serves the published adapter from S3. The Secret also carries an HF token that nothing should use. Then
every place a value could leak is searched, plain and base64-encoded: the operator's log, every container's
log, the LoRAJob and AdapterDeployment objects (status included), every Event, every pod (termination messages
and env), every Job and every ConfigMap in the namespace.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_adapterdeployment import Env as ServingEnv
from .test_adapterdeployment import adapter_deployment, chat

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]
GROUP_PATH = "/apis/kubelora.io/v1alpha1/namespaces"
SECRET = "s3-creds"
BUCKET = "lora"
TIMEOUT = 300.0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(cluster: LocalCluster) -> Iterator[str]:
    """A moto S3 server on the node's bridge address, which every pod can reach; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    host = cluster.info.node_ip
    port = _free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def secret_values() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {"AWS_ACCESS_KEY_ID": f"AKIAKUBELORA{tag.upper()}",
            "AWS_SECRET_ACCESS_KEY": f"kl-secret-{tag}-must-not-leak", "HF_TOKEN": f"hf_kubelora_{tag}_unused"}


def lorajob(name: str) -> Obj:
    creds = {"credentialsSecretRef": SECRET}
    return {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "metadata": {"name": name}, "spec": {
        "baseModel": {"uri": "pvc://models/tiny"},
        "dataset": {"uri": f"s3://{BUCKET}/data/chat.jsonl", "evalSplit": 0.1, **creds},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "targetModules": ["all-linear"]},
        "training": {"maxSteps": 4, "saveSteps": 2, "evalSteps": 2, "batchSize": 4, "gradientAccumulationSteps": 1,
                     "learningRate": 5e-3, "maxSeqLength": 128, "optimizer": "adamw_torch",
                     "gradientCheckpointing": False},
        "resources": {"gpus": 0},
        "output": {"uri": f"s3://{BUCKET}/adapters/{name}", **creds},
        "backoffLimit": 1,
    }}


def everything_written(cluster: LocalCluster, ns: str, operator: OperatorProcess) -> dict[str, str]:
    """Where a value could leak -> its text."""
    kube = cluster.kube
    found: dict[str, str] = {"operator log": operator.logs()}
    for path in (cluster.state_dir / "logs" / ns).rglob("*.log"):
        found[f"log {path.relative_to(cluster.state_dir)}"] = path.read_text(errors="replace")
    lists = {
        "LoRAJobs": f"{GROUP_PATH}/{ns}/lorajobs",
        "AdapterDeployments": f"{GROUP_PATH}/{ns}/adapterdeployments",
        "Events": f"/api/v1/namespaces/{ns}/events",
        "events.k8s.io Events": f"/apis/events.k8s.io/v1/namespaces/{ns}/events",
        "Pods": f"/api/v1/namespaces/{ns}/pods",
        "Jobs": f"/apis/batch/v1/namespaces/{ns}/jobs",
        "Deployments": f"/apis/apps/v1/namespaces/{ns}/deployments",
        "ConfigMaps": f"/api/v1/namespaces/{ns}/configmaps",
    }
    for what, path in lists.items():
        items: list[Obj] = kube.get(path)["items"]
        for item in items:
            found[f"{what} {item['metadata']['name']}"] = json.dumps(item)
    return found


def termination_messages(cluster: LocalCluster, ns: str) -> list[str]:
    pods: list[Obj] = cluster.kube.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    return [state["terminated"].get("message", "")
            for pod in pods for c in pod["status"].get("containerStatuses") or []
            for state in (c.get("state") or {}, c.get("lastState") or {}) if "terminated" in state]


def leaks(found: dict[str, str], values: dict[str, str]) -> list[str]:
    out = []
    for key, value in values.items():
        needles = {value, base64.b64encode(value.encode()).decode()}
        out += [f"{key} in {where}" for where, text in found.items() if any(n in text for n in needles)]
    return out


def test_credentials_appear_in_no_log_status_event_termination_message_or_configmap(
        cluster: LocalCluster, namespace: str, operator: OperatorProcess, s3: str, tmp_path: Path) -> None:
    import boto3

    values = secret_values()
    kube, ns = cluster.kube, namespace
    base_dir = build_tiny_model(cluster.pvc_dir(ns, "models") / "tiny")
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1",
                          aws_access_key_id=values["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=values["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    client.upload_file(str(data), BUCKET, "data/chat.jsonl")
    kube.create(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
        "stringData": {**values, "AWS_ENDPOINT_URL": s3, "AWS_REGION": "us-east-1"}})

    kube.create(f"{GROUP_PATH}/{ns}/lorajobs", lorajob("bot"))
    status: Obj = cluster.wait_for(
        lambda: s if (s := kube.get(f"{GROUP_PATH}/{ns}/lorajobs/bot").get("status") or {}).get("phase")
        in ("Succeeded", "Failed") else None, TIMEOUT, "LoRAJob bot to finish")
    assert status["phase"] == "Succeeded", (status, operator.tail(40))
    assert status["adapter"]["uri"] == f"s3://{BUCKET}/adapters/bot/rev-1"

    body = adapter_deployment("chat", [{"name": "support", "loraJobRef": {"name": "bot"}}])
    body["spec"]["baseModel"]["credentialsSecretRef"] = SECRET
    kube.create(f"{GROUP_PATH}/{ns}/adapterdeployments", body)
    serving = ServingEnv(cluster, ns, base_dir)
    serving.wait_adapters("chat", {"support": "Loaded"}, timeout=TIMEOUT)
    assert chat(serving.ready_pod("chat"), "support").status_code == 200

    found = everything_written(cluster, ns, operator)
    # The search must have looked where it claims to: the trainer's and the agent's logs, the trainer's
    # termination message, the trainer ConfigMap and the adapters ConfigMap, the operator's Events.
    assert any("trainer.log" in w for w in found) and any("agent.log" in w for w in found), sorted(found)
    assert any(m.strip() for m in termination_messages(cluster, ns))
    assert "ConfigMaps chat-adapters" in found and sum(w.startswith("ConfigMaps bot") for w in found) >= 1
    assert any(w.startswith("Events ") for w in found)
    assert f"s3://{BUCKET}/adapters/bot/rev-1" in found["ConfigMaps chat-adapters"]
    assert leaks(found, values) == []
