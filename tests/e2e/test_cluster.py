"""The local cluster behaves like the Kubernetes platform teams run: v1.37, a real scheduler against
the node's capacity (GPUs included), cluster DNS for headless Services and Indexed Jobs, and
kstatus' verdicts on live objects."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from kubelora_local import build

from .conftest import SESSION_GPUS, LocalCluster

pytestmark = pytest.mark.e2e


def _pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "ghcr.io/kubelora/trainer:dev", "command": command}],
            **spec,
        },
    }


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    pod = _pod(name, ["true"])
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return pod


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def test_server_is_kubernetes_v1_37(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kube.text("/version"))
    assert version["gitVersion"] == "v1.37.2"
    # What the next features need is served: ValidatingAdmissionPolicy, Job podFailurePolicy.
    assert cluster.kube.get("/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies")["items"] == []
    assert "podFailurePolicy" in json.dumps(cluster.kube.get("/openapi/v3/apis/batch/v1"))


def test_gpu_requests_schedule_against_node_capacity(cluster: LocalCluster, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    cluster.kube.create(pods, _gpu_pod("too-many", SESSION_GPUS + 1))
    cluster.kube.create(pods, _gpu_pod("fits", SESSION_GPUS))

    done = cluster.wait_for(
        lambda: (p := cluster.kube.get(f"{pods}/fits"))["status"].get("phase") == "Succeeded" and p,
        timeout=60,
        what="the pod that fits the node's GPUs to run",
    )
    assert done["spec"]["nodeName"] == "local-node"
    scheduled = cluster.wait_for(
        lambda: (
            _condition(cluster.kube.get(f"{pods}/too-many"), "PodScheduled").get("reason") == "Unschedulable"
            and _condition(cluster.kube.get(f"{pods}/too-many"), "PodScheduled")
        ),
        timeout=30,
        what="the scheduler's verdict on the pod asking for more GPUs than the node has",
    )
    assert scheduled["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    pending = cluster.kube.get(f"{pods}/too-many")
    assert pending["status"]["phase"] == "Pending" and not pending["spec"].get("nodeName")


RESOLVE = """
import json, os, socket
me = socket.gethostname()
peers = {h: socket.gethostbyname(f"{h}.workers") for h in ("resolve-0", "resolve-1")}
fqdn = socket.gethostbyname(f"resolve-0.workers.{os.environ['NS']}.svc.cluster.local")
print(json.dumps({"me": me, "index": os.environ["JOB_COMPLETION_INDEX"], "peers": peers, "fqdn": fqdn}))
"""


def test_indexed_job_pods_resolve_each_other_through_a_headless_service(cluster: LocalCluster, namespace: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "workers"},
        # Multi-node training needs the peers' names before they are Ready.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": "resolve"}},
    }
    cluster.kube.create(f"/api/v1/namespaces/{namespace}/services", service)
    # Each pod waits until both names resolve: the second pod may start a moment after the first.
    command = [
        "python",
        "-c",
        "import time,socket\nfor _ in range(300):\n try:\n"
        "  [socket.gethostbyname(f'resolve-{i}.workers') for i in (0, 1)]; break\n"
        " except OSError: time.sleep(0.1)\n" + RESOLVE,
    ]
    pod = _pod("x", command)["spec"]
    pod["subdomain"] = "workers"
    pod["containers"][0]["env"] = [{"name": "NS", "value": namespace}]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "resolve"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": pod},
        },
    }
    cluster.kube.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
    cluster.wait_for(
        lambda: cluster.kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/resolve")["status"].get("succeeded") == 2,
        timeout=90,
        what="both indexed pods to resolve their peers",
    )
    pods = cluster.kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=resolve")["items"]
    ips = {p["spec"]["hostname"]: p["status"]["podIP"] for p in pods}
    assert set(ips) == {"resolve-0", "resolve-1"}  # hostnames come from the Job controller
    for p in pods:
        out = json.loads(cluster.logs(namespace, p["metadata"]["name"], "main").strip().splitlines()[-1])
        assert out["me"] == p["spec"]["hostname"]
        assert out["index"] == p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert out["peers"] == ips
        assert out["fqdn"] == ips["resolve-0"]


@pytest.fixture(scope="session")
def kstatus() -> str:
    """The hack/kstatus binary (built from sigs.k8s.io/cli-utils on first use, cached)."""
    return str(build.build(("kstatus",))["kstatus"])


def kstatus_of(binary: str, obj: dict[str, Any]) -> str:
    out = subprocess.run([binary], input=json.dumps(obj), capture_output=True, text=True, check=True, timeout=30)
    return str(json.loads(out.stdout)["status"])


def test_kstatus_reads_live_objects_as_gitops_tools_do(cluster: LocalCluster, namespace: str, kstatus: str) -> None:
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"

    def job(name: str, command: list[str]) -> dict[str, Any]:
        pod = _pod(name, command)["spec"]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": pod}},
        }

    cluster.kube.create(jobs, job("ok", ["true"]))
    cluster.kube.create(jobs, job("bad", ["false"]))
    # A Deployment whose pod cannot schedule is still rolling out.
    pod = _gpu_pod("x", SESSION_GPUS + 1)["spec"]
    pod["restartPolicy"] = "Always"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "waits"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "waits"}},
            "template": {"metadata": {"labels": {"app": "waits"}}, "spec": pod},
        },
    }
    cluster.kube.create(f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment)

    cluster.wait_for(lambda: kstatus_of(kstatus, cluster.kube.get(f"{jobs}/ok")) == "Current", timeout=30, what="ok")
    cluster.wait_for(lambda: kstatus_of(kstatus, cluster.kube.get(f"{jobs}/bad")) == "Failed", timeout=30, what="bad")
    waits = f"/apis/apps/v1/namespaces/{namespace}/deployments/waits"
    cluster.wait_for(lambda: cluster.kube.get(waits).get("status", {}).get("observedGeneration"), what="rollout")
    assert kstatus_of(kstatus, cluster.kube.get(waits)) == "InProgress"
    # A whole list at once, as `kubectl get -o json` prints it (items come without kind).
    verdicts = subprocess.run(
        [kstatus], input=json.dumps(cluster.kube.get(jobs)), capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    assert sorted(json.loads(v)["status"] for v in verdicts) == ["Current", "Failed"]
