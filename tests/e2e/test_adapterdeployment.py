"""AdapterDeployment end to end on the local cluster with ``engine: cpu``: the operator, the agent sidecar
and the CPU engine serving a tiny model, with adapters from a LoRAJob and from URIs.

What is checked is what users rely on: every listed adapter answers chat completions under its own name,
adapters come and go without restarting pods, a bad adapter fails alone with a reason, and a replaced pod
comes back with every adapter loaded. Pods are reached on their pod IP (there is no kube-proxy locally).

The LoRAJob adapter is trained for real by default. ``KUBELORA_E2E_FAKE_LORAJOB=1`` instead publishes a
prepared adapter through the LoRAJob's status subresource (for when the training path is unavailable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelora_local import build
from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

from .conftest import LocalCluster

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]
GROUP_PATH = "/apis/kubelora.io/v1alpha1/namespaces"
BASE_URI = "pvc://models/tiny"
SERVED = "tiny"
FAKE_LORAJOB = os.environ.get("KUBELORA_E2E_FAKE_LORAJOB") == "1"
READY_TIMEOUT = 240.0


@dataclass
class Env:
    cluster: LocalCluster
    ns: str
    base_dir: Path

    def ad_path(self, name: str) -> str:
        return f"{GROUP_PATH}/{self.ns}/adapterdeployments/{name}"

    def status(self, name: str) -> Obj:
        status: Obj = self.cluster.kube.get(self.ad_path(name)).get("status") or {}
        return status

    def adapters(self, name: str) -> dict[str, Obj]:
        return {a["name"]: a for a in self.status(name).get("adapters") or []}

    def pods(self, name: str) -> list[Obj]:
        items: list[Obj] = self.cluster.kube.get(
            f"/api/v1/namespaces/{self.ns}/pods", labelSelector=f"kubelora.io/adapterdeployment={name}"
        )["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def wait_adapters(self, name: str, expected: dict[str, str], timeout: float = READY_TIMEOUT) -> dict[str, Obj]:
        """Wait until status.adapters has exactly these names in these states."""

        def check() -> dict[str, Obj] | None:
            adapters = self.adapters(name)
            return adapters if {n: a["state"] for n, a in adapters.items()} == expected else None

        result: dict[str, Obj] = self.cluster.wait_for(
            check, timeout=timeout, what=f"{name} adapters {expected} (last: {self._summary(name)})"
        )
        return result

    def wait_phase(self, name: str, phase: str, timeout: float = READY_TIMEOUT) -> Obj:
        status: Obj = self.cluster.wait_for(
            lambda: s if (s := self.status(name)).get("phase") == phase else None,
            timeout=timeout,
            what=f"{name} phase {phase} (last: {self._summary(name)})",
        )
        return status

    def _summary(self, name: str) -> str:
        try:
            s = self.status(name)
        except Exception as exc:
            return repr(exc)
        states = [(a["name"], a["state"], a.get("reason")) for a in s.get("adapters") or []]
        return f"phase={s.get('phase')} adapters={states}"

    def ready_pods(self, name: str) -> list[Obj]:
        return [
            p
            for p in self.pods(name)
            if p["status"].get("phase") == "Running"
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
        ]

    def ready_pod(self, name: str) -> Obj:
        """Wait for exactly one pod of ``name`` (all tests run one replica) to be Ready."""
        pod: Obj = self.cluster.wait_for(
            lambda: p[0] if len(p := self.ready_pods(name)) == 1 and len(self.pods(name)) == 1 else None,
            timeout=READY_TIMEOUT,
            what=f"one Ready pod of {name}",
        )
        return pod


def chat(pod: Obj, model: str) -> httpx.Response:
    return httpx.post(
        f"http://{pod['status']['podIP']}:8000/v1/chat/completions",
        timeout=120,
        json={
            "model": model,
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What colour is the sky?"}],
        },
    )


def served_models(pod: Obj) -> set[str]:
    resp = httpx.get(f"http://{pod['status']['podIP']}:8000/v1/models", timeout=30)
    resp.raise_for_status()
    return {m["id"] for m in resp.json()["data"]}


def restarts(pod: Obj) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or [])


def assert_no_writes(env: Env, name: str, seconds: float = 6.0) -> None:
    """At steady state the operator polls the agents but writes nothing (three poll intervals)."""
    before = env.cluster.kube.get(env.ad_path(name))["metadata"]["resourceVersion"]
    cm = f"/api/v1/namespaces/{env.ns}/configmaps/{name}-adapters"
    cm_before = env.cluster.kube.get(cm)["metadata"]["resourceVersion"]
    time.sleep(seconds)
    assert env.cluster.kube.get(env.ad_path(name))["metadata"]["resourceVersion"] == before
    assert env.cluster.kube.get(cm)["metadata"]["resourceVersion"] == cm_before


def adapter_deployment(name: str, adapters: list[Obj], replicas: int = 1) -> Obj:
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": BASE_URI, "servedName": SERVED},
            "engine": "cpu",
            "replicas": replicas,
            "resources": {"gpus": 0},
            "vllm": {"maxLoras": 4, "maxLoraRank": 16, "maxCpuLoras": 8},
            "adapters": adapters,
        },
    }


def make_uri_adapter(env: Env, name: str, seed: int, base_model: str = BASE_URI) -> str:
    from kubelora_server.testing import make_adapter

    make_adapter(
        env.base_dir,
        env.cluster.pvc_dir(env.ns, "adapters") / name,
        rank=8,
        seed=seed,
        base_model=base_model,
        scale=20.0,
    )
    return f"pvc://adapters/{name}"


def corrupt_copy(env: Env, source: str, name: str) -> str:
    root = env.cluster.pvc_dir(env.ns, "adapters")
    shutil.copytree(root / source, root / name)
    weights = root / name / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return f"pvc://adapters/{name}"


def publish_lorajob(env: Env, name: str) -> Obj:
    """A LoRAJob whose status.adapter the AdapterDeployment resolves; trained for real unless faked."""
    kube = env.cluster.kube
    write_chat_dataset(env.cluster.pvc_dir(env.ns, "data") / "chat.jsonl", n=32)
    body = {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": BASE_URI},
            "dataset": {"uri": "pvc://data/chat.jsonl", "evalSplit": 0.1},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "targetModules": ["all-linear"]},
            "training": {
                "maxSteps": 4,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "learningRate": 5e-3,
                "maxSeqLength": 128,
                "optimizer": "adamw_torch",
                "gradientCheckpointing": False,
                "evalSteps": 2,
                "saveSteps": 2,
            },
            "resources": {"gpus": 0},
            "output": {"uri": f"pvc://adapters/{name}"},
            "suspend": FAKE_LORAJOB,
        },
    }
    kube.create(f"{GROUP_PATH}/{env.ns}/lorajobs", body)
    path = f"{GROUP_PATH}/{env.ns}/lorajobs/{name}"
    if FAKE_LORAJOB:
        from kubelora_server.testing import make_adapter

        adapter_dir = env.cluster.pvc_dir(env.ns, "adapters") / name / "rev-1"
        make_adapter(env.base_dir, adapter_dir, rank=8, seed=7, base_model=BASE_URI, scale=20.0)
        info = json.loads((adapter_dir / "kubelora-manifest.json").read_text())
        kube.merge_patch(
            f"{path}/status",
            {
                "status": {
                    "phase": "Succeeded",
                    "adapter": {
                        "uri": f"pvc://adapters/{name}/rev-1",
                        "digest": info["digest"],
                        "sizeBytes": info["sizeBytes"],
                        "rank": info["rank"],
                        "baseModel": BASE_URI,
                        "peftType": "LORA",
                    },
                }
            },
        )
    job: Obj = env.cluster.wait_for(
        lambda: j if (j := kube.get(path)).get("status", {}).get("adapter") else None,
        timeout=READY_TIMEOUT,
        what=f"LoRAJob {name} to publish its adapter",
    )
    return job


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: Any, tmp_path: Path) -> Iterator[Env]:
    """A namespace with the tiny base model on PVC ``models``, PVCs ``data`` and ``adapters``, the operator running."""
    base_dir = build_tiny_model(cluster.pvc_dir(namespace, "models") / "tiny")
    for claim in ("data", "adapters"):
        cluster.pvc_dir(namespace, claim)
    yield Env(cluster, namespace, base_dir)


def test_serves_lorajob_and_uri_adapters_and_changes_them_without_restarts(env: Env) -> None:
    publish_lorajob(env, "support-bot")
    legal = make_uri_adapter(env, "legal", seed=2)
    env.cluster.kube.create(
        f"{GROUP_PATH}/{env.ns}/adapterdeployments",
        adapter_deployment(
            "chat", [{"name": "support", "loraJobRef": {"name": "support-bot"}}, {"name": "legal", "uri": legal}]
        ),
    )

    status = env.wait_phase("chat", "Ready")
    assert status["adaptersReady"] == "2/2"
    assert status["endpoint"] == f"http://chat.{env.ns}.svc:8000/v1"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Reconciling": "False",
        "Stalled": "False",
        "Progressing": "False",
        "Degraded": "False",
    }
    assert_no_writes(env, "chat")
    pod = env.ready_pod("chat")
    for model in (SERVED, "support", "legal"):
        resp = chat(pod, model)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
    uid, before = pod["metadata"]["uid"], restarts(pod)
    template_hash = env.cluster.kube.get(f"/apis/apps/v1/namespaces/{env.ns}/deployments/chat")["spec"]["template"][
        "metadata"
    ]["annotations"]["kubelora.io/template-hash"]

    # A third adapter is loaded at runtime: same pod, no restart, same template.
    sales = make_uri_adapter(env, "sales", seed=3)
    env.cluster.kube.merge_patch(
        env.ad_path("chat"),
        {
            "spec": {
                "adapters": [
                    {"name": "support", "loraJobRef": {"name": "support-bot"}},
                    {"name": "legal", "uri": legal},
                    {"name": "sales", "uri": sales},
                ]
            }
        },
    )
    env.wait_adapters("chat", {"support": "Loaded", "legal": "Loaded", "sales": "Loaded"})
    assert chat(pod, "sales").status_code == 200
    # Removing one unloads it; the others keep answering.
    env.cluster.kube.merge_patch(
        env.ad_path("chat"),
        {
            "spec": {
                "adapters": [
                    {"name": "support", "loraJobRef": {"name": "support-bot"}},
                    {"name": "sales", "uri": sales},
                ]
            }
        },
    )
    env.wait_adapters("chat", {"support": "Loaded", "sales": "Loaded"})
    env.cluster.wait_for(lambda: "legal" not in served_models(pod), timeout=60, what="legal unloaded")
    assert chat(pod, "legal").status_code == 404
    assert chat(pod, "support").status_code == 200

    [after] = env.pods("chat")
    assert (after["metadata"]["uid"], restarts(after)) == (uid, before)
    assert (
        env.cluster.kube.get(f"/apis/apps/v1/namespaces/{env.ns}/deployments/chat")["spec"]["template"]["metadata"][
            "annotations"
        ]["kubelora.io/template-hash"]
        == template_hash
    )
    assert env.wait_phase("chat", "Ready")["adaptersReady"] == "2/2"


def test_bad_adapters_fail_alone(env: Env) -> None:
    good = make_uri_adapter(env, "good", seed=4)
    corrupt = corrupt_copy(env, "good", "corrupt")
    foreign = make_uri_adapter(env, "foreign", seed=5, base_model="hf://someone/another-model")
    env.cluster.kube.create(
        f"{GROUP_PATH}/{env.ns}/adapterdeployments",
        adapter_deployment(
            "mixed",
            [
                {"name": "good", "uri": good},
                {"name": "corrupt", "uri": corrupt},
                {"name": "foreign", "uri": foreign},
                {"name": "orphan", "loraJobRef": {"name": "no-such-job"}},
            ],
        ),
    )

    adapters = env.wait_adapters(
        "mixed", {"good": "Loaded", "corrupt": "Failed", "foreign": "Failed", "orphan": "Failed"}
    )
    assert adapters["corrupt"]["reason"] in ("DigestMismatch", "ManifestInvalid")
    assert adapters["foreign"]["reason"] == "BaseModelMismatch"
    assert adapters["orphan"]["reason"] == "LoRAJobNotFound"
    # Degraded, yet Ready: every valid adapter is served (once the pod's readiness probe has passed).
    status: Obj = env.cluster.wait_for(
        lambda: (
            st
            if (st := env.status("mixed")).get("phase") == "Degraded"
            and {c["type"]: c["status"] for c in st["conditions"]}.get("Ready") == "True"
            else None
        ),
        timeout=READY_TIMEOUT,
        what="mixed Degraded and Ready",
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["reason"] == "AdaptersFailed"
    assert "corrupt" in conditions["Degraded"]["message"] and "orphan" in conditions["Degraded"]["message"]
    pod = env.ready_pod("mixed")
    assert chat(pod, "good").status_code == 200
    assert chat(pod, SERVED).status_code == 200
    assert chat(pod, "corrupt").status_code == 404


def test_replacement_pod_loads_every_adapter(env: Env) -> None:
    one, two = make_uri_adapter(env, "one", seed=6), make_uri_adapter(env, "two", seed=8)
    env.cluster.kube.create(
        f"{GROUP_PATH}/{env.ns}/adapterdeployments",
        adapter_deployment("resilient", [{"name": "one", "uri": one}, {"name": "two", "uri": two}]),
    )
    env.wait_phase("resilient", "Ready")
    old = env.ready_pod("resilient")
    env.cluster.kube.delete(f"/api/v1/namespaces/{env.ns}/pods/{old['metadata']['name']}")

    def replacement() -> Obj | None:
        pods = env.ready_pods("resilient")
        return pods[0] if len(pods) == 1 and pods[0]["metadata"]["uid"] != old["metadata"]["uid"] else None

    new: Obj = env.cluster.wait_for(replacement, timeout=READY_TIMEOUT, what="a Ready replacement pod")
    adapters = env.wait_adapters("resilient", {"one": "Loaded", "two": "Loaded"})
    assert all(a["loadedReplicas"] == 1 for a in adapters.values())
    assert {"one", "two", SERVED} <= served_models(new)
    for model in ("one", "two"):
        assert chat(new, model).status_code == 200
    assert env.wait_phase("resilient", "Ready")["readyReplicas"] == 1

    # A Deployment deleted by hand is put back by the operator (noticed through its index).
    dep_path = f"/apis/apps/v1/namespaces/{env.ns}/deployments/resilient"
    old_dep = env.cluster.kube.get(dep_path)["metadata"]["uid"]
    env.cluster.kube.delete(dep_path)
    env.cluster.wait_for(
        lambda: env.cluster.kube.get(dep_path)["metadata"]["uid"] != old_dep,
        timeout=60,
        what="the Deployment re-created",
    )
    env.wait_adapters("resilient", {"one": "Loaded", "two": "Loaded"})


def test_new_lorajob_run_rolls_the_adapter_forward_in_place(env: Env) -> None:
    job = publish_lorajob(env, "bot")
    first = job["status"]["adapter"]
    env.cluster.kube.create(
        f"{GROUP_PATH}/{env.ns}/adapterdeployments",
        adapter_deployment("roll", [{"name": "support", "loraJobRef": {"name": "bot"}}]),
    )
    assert env.wait_adapters("roll", {"support": "Loaded"})["support"]["digest"] == first["digest"]
    pod = env.ready_pod("roll")
    uid, before = pod["metadata"]["uid"], restarts(pod)

    # Retrain (a training field changes -> a new revision). Meanwhile the old adapter keeps answering.
    job_path = f"{GROUP_PATH}/{env.ns}/lorajobs/bot"
    env.cluster.kube.merge_patch(job_path, {"spec": {"training": {"maxSteps": 6}}})
    assert chat(pod, "support").status_code == 200
    second = env.cluster.wait_for(
        lambda: (
            a
            if (a := env.cluster.kube.get(job_path).get("status", {}).get("adapter") or {}).get("digest")
            not in (None, first["digest"])
            else None
        ),
        timeout=READY_TIMEOUT,
        what="the retrained adapter",
    )
    assert second["uri"] != first["uri"]

    def rolled() -> Obj | None:
        support = env.adapters("roll").get("support") or {}
        return support if support.get("state") == "Loaded" and support.get("digest") == second["digest"] else None

    env.cluster.wait_for(rolled, timeout=READY_TIMEOUT, what=f"support at {second['digest']}")
    desired = json.loads(
        env.cluster.kube.get(f"/api/v1/namespaces/{env.ns}/configmaps/roll-adapters")["data"]["adapters.json"]
    )
    assert desired["adapters"] == [{"name": "support", "uri": second["uri"], "digest": second["digest"]}]
    assert chat(pod, "support").status_code == 200
    [after] = env.pods("roll")
    assert (after["metadata"]["uid"], restarts(after)) == (uid, before)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        pytest.param({"baseModel": {"uri": "s3://models/tiny", "servedName": SERVED}}, "pvc://", id="s3-base-model"),
        pytest.param({"adapters": [{"name": "a", "uri": "pvc://adapters/../a"}]}, "'..' is not allowed",
                     id="adapter-uri-escapes-its-claim"),
    ],
)
def test_unservable_spec_fails_without_pods(env: Env, spec: Obj, needle: str) -> None:
    body = adapter_deployment("broken", [])
    body["spec"].update(spec)
    env.cluster.kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments", body)
    status = env.wait_phase("broken", "Failed", timeout=60)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert needle in ready["message"]
    deployments = env.cluster.kube.get(f"/apis/apps/v1/namespaces/{env.ns}/deployments")["items"]
    assert deployments == []


@pytest.fixture(scope="module")
def kstatus() -> str:
    """The hack/kstatus binary: the verdict Flux and kpt compute (sigs.k8s.io/cli-utils)."""
    return str(build.build(("kstatus",))["kstatus"])


def verdict(binary: str, obj: Obj) -> str:
    out = subprocess.run([binary], input=json.dumps(obj), capture_output=True, text=True, check=True, timeout=30)
    return str(json.loads(out.stdout)["status"])


def kubectl(env: Env, *args: str) -> str:
    out = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "kubectl"), f"--kubeconfig={env.cluster.kubeconfig}", "-n", env.ns, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_scale_subresource_pdb_labels_no_finalizer_and_kstatus(env: Env, kstatus: str) -> None:
    one = make_uri_adapter(env, "one", seed=11)
    body = adapter_deployment("scaled", [{"name": "one", "uri": one}])
    # Argo CD's tracking label on the owner must not be copied to the children (Argo CD would prune them).
    body["metadata"]["labels"] = {"app.kubernetes.io/instance": "argo-app", "team": "a"}
    env.cluster.kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments", body)
    env.wait_phase("scaled", "Ready")
    obj = env.cluster.kube.get(env.ad_path("scaled"))
    assert not obj["metadata"].get("finalizers"), "no finalizer: deleting never waits for the operator"
    assert verdict(kstatus, obj) == "Current"
    assert obj["status"]["selector"] == "app.kubernetes.io/component=server,kubelora.io/adapterdeployment=scaled"

    apps = f"/apis/apps/v1/namespaces/{env.ns}"
    pdb = env.cluster.kube.get(f"/apis/policy/v1/namespaces/{env.ns}/poddisruptionbudgets/scaled")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert [o["uid"] for o in pdb["metadata"]["ownerReferences"]] == [obj["metadata"]["uid"]]
    dep = env.cluster.kube.get(f"{apps}/deployments/scaled")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}  # CPU: no gap
    service = env.cluster.kube.get(f"/api/v1/namespaces/{env.ns}/services/scaled")
    for child in (dep, pdb, env.pods("scaled")[0], service):
        labels = child["metadata"]["labels"]
        assert labels["kubelora.io/adapterdeployment"] == "scaled"
        assert "app.kubernetes.io/instance" not in labels and "team" not in labels

    # The scale subresource: what `kubectl scale` and an HPA use. The Deployment follows spec.replicas.
    kubectl(env, "scale", "adapterdeployment/scaled", "--replicas=2")
    scaled = env.cluster.kube.get(env.ad_path("scaled"))
    assert scaled["spec"]["replicas"] == 2
    assert verdict(kstatus, scaled) == "InProgress", "a generation the operator has not applied yet"
    env.cluster.wait_for(
        lambda: env.cluster.kube.get(f"{apps}/deployments/scaled")["spec"]["replicas"] == 2,
        timeout=60,
        what="the Deployment to follow the scale subresource",
    )
    scale = json.loads(kubectl(env, "get", "--raw", f"{env.ad_path('scaled')}/scale"))
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["selector"] == obj["status"]["selector"]
    env.cluster.wait_for(
        lambda: env.status("scaled").get("readyReplicas") == 2 and env.status("scaled").get("phase") == "Ready",
        timeout=READY_TIMEOUT,
        what="two Ready replicas",
    )
    assert verdict(kstatus, env.cluster.kube.get(env.ad_path("scaled"))) == "Current"


def test_kstatus_reads_bad_spec_and_unschedulable_as_failed(env: Env, kstatus: str) -> None:
    bad = adapter_deployment("ks-bad", [])
    bad["spec"]["baseModel"]["uri"] = "s3://models/tiny"  # the engines cannot open it: InvalidSpec
    env.cluster.kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments", bad)
    # A GPU pod asking for more GPUs than the node has waits unschedulable: Reconciling first, then Stalled.
    greedy = adapter_deployment("ks-greedy", [])
    greedy["spec"].update({"engine": "vllm", "resources": {"gpus": 2}})
    env.cluster.kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments", greedy)

    env.wait_phase("ks-bad", "Failed", timeout=60)
    obj = env.cluster.kube.get(env.ad_path("ks-bad"))
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert verdict(kstatus, obj) == "Failed"

    def unschedulable() -> Obj | None:
        st = env.status("ks-greedy")
        return st if "Unschedulable" in (st.get("message") or "") else None

    st = env.cluster.wait_for(unschedulable, timeout=60, what="the scheduler's reason in status.message")
    assert "nvidia.com/gpu" in st["message"]
    assert verdict(kstatus, env.cluster.kube.get(env.ad_path("ks-greedy"))) == "InProgress"
    dep = env.cluster.kube.get(f"/apis/apps/v1/namespaces/{env.ns}/deployments/ks-greedy")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}  # GPU: no spare needed
    env.wait_phase("ks-greedy", "Failed", timeout=120)
    obj = env.cluster.kube.get(env.ad_path("ks-greedy"))
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Unschedulable")
    assert verdict(kstatus, obj) == "Failed"
