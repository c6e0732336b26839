"""The local pod runner behaves like a kubelet for what KubeLoRA needs (Jobs, Deployments, volumes)."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from typing import Any

import pytest

from kubelora_local.__main__ import main as kubelora_local_main

from .conftest import LocalCluster

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]


def _pods(cluster: LocalCluster, ns: str, selector: str) -> list[Obj]:
    items: list[Obj] = cluster.kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector)["items"]
    return items


def _pod(cluster: LocalCluster, ns: str, name: str) -> Obj:
    return cluster.kube.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def _job(name: str, command: list[str], image: str = "ghcr.io/kubelora/trainer:dev", backoff: int = 0) -> Obj:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": image, "command": command}],
                }
            },
        },
    }


def _condition(obj: Obj, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in obj.get("status", {}).get("conditions") or [])


def _wait_job(cluster: LocalCluster, ns: str, name: str, condition: str, timeout: float) -> Obj:
    def done() -> Obj | None:
        job = cluster.kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
        return job if _condition(job, condition) else None

    job: Obj = cluster.wait_for(done, timeout=timeout, what=f"Job {name} {condition}")
    return job


def _waiting(cluster: LocalCluster, ns: str, name: str) -> Obj:
    state: Obj = _pod(cluster, ns, name)["status"]["containerStatuses"][0]["state"]
    return state.get("waiting") or {}


def _pid(pod: Obj) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def _create(cluster: LocalCluster, path: str, body: Obj) -> Obj:
    return cluster.kube.create(path, body)


@pytest.mark.parametrize(
    ("image", "command"),
    [
        ("ghcr.io/kubelora/trainer:dev", ["python", "-c", "print('hello from the job')"]),
        ("ghcr.io/kubelora/noop:dev", ["does-not-exist-anywhere"]),
    ],
    ids=["python", "noop"],
)
def test_job_runs_to_completion(cluster: LocalCluster, namespace: str, image: str, command: list[str]) -> None:
    _create(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs", _job("hello", command, image))
    job = _wait_job(cluster, namespace, "hello", "Complete", timeout=30)
    assert job["status"]["succeeded"] == 1
    (pod,) = _pods(cluster, namespace, "job-name=hello")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] == "local-node"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    if "python" in command:
        assert "hello from the job" in cluster.logs(namespace, pod["metadata"]["name"], "main")


def test_failing_job_is_retried_per_backoff_limit(cluster: LocalCluster, namespace: str) -> None:
    cmd = ["python", "-c", "import sys; print('boom'); sys.exit(3)"]
    _create(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs", _job("fails", cmd, backoff=1))
    job = _wait_job(cluster, namespace, "fails", "Failed", timeout=40)
    assert job["status"]["failed"] == 2  # the first try + backoffLimit retries
    pods = _pods(cluster, namespace, "job-name=fails")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"


def _deployment(name: str, replicas: int) -> Obj:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "web",
                            "image": "ghcr.io/kubelora/server:dev",
                            "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": "http"},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def test_deployment_becomes_ready_and_deletion_stops_processes(cluster: LocalCluster, namespace: str) -> None:
    apps = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    _create(cluster, apps, _deployment("web", 2))
    cluster.wait_for(
        lambda: cluster.kube.get(f"{apps}/web").get("status", {}).get("readyReplicas") == 2,
        timeout=30,
        what="2 ready replicas",
    )
    pods = _pods(cluster, namespace, "app=web")
    assert len(pods) == 2
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith(cluster.info.pod_subnet + ".") for ip in ips)
    for pod in pods:
        assert _condition(pod, "Ready") and _condition(pod, "ContainersReady")
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/", timeout=5) as resp:
            assert resp.status == 200
    # The python client sees the same through the kubeconfig the fixture exported.
    listed = cluster.core.list_namespaced_pod(namespace, label_selector="app=web")
    assert {p.status.pod_ip for p in listed.items} == ips

    pids = [_pid(p) for p in pods]
    assert all(_alive(pid) for pid in pids)
    cluster.kube.delete(f"{apps}/web", {"propagationPolicy": "Background"})
    cluster.wait_for(lambda: not _pods(cluster, namespace, "app=web"), timeout=30, what="pods gone")
    assert not any(_alive(pid) for pid in pids)
    assert not any(_port_open(ip, 8080) for ip in ips)


def test_termination_message_reaches_pod_status(cluster: LocalCluster, namespace: str) -> None:
    write_and_fail = "open('/dev/termination-log', 'w').write('{\"ok\": false}'); raise SystemExit(1)"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "msg"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "file", "image": "ghcr.io/kubelora/trainer:dev", "command": ["python", "-c", write_and_fail]},
                {
                    "name": "custom-path",
                    "image": "ghcr.io/kubelora/trainer:dev",
                    "command": ["sh", "-c", "echo done > /tmp/kubelora-result/msg"],
                    "terminationMessagePath": "/tmp/kubelora-result/msg",
                },
                {
                    "name": "fallback",
                    "image": "ghcr.io/kubelora/trainer:dev",
                    "command": ["sh", "-c", "echo last words; exit 2"],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                },
            ],
        },
    }
    _create(cluster, f"/api/v1/namespaces/{namespace}/pods", pod)
    got = cluster.wait_for(
        lambda: (p := _pod(cluster, namespace, "msg"))["status"].get("phase") == "Failed" and p,
        timeout=20,
        what="pod Failed",
    )
    states = {c["name"]: c["state"]["terminated"] for c in got["status"]["containerStatuses"]}
    assert states["file"]["exitCode"] == 1 and json.loads(states["file"]["message"]) == {"ok": False}
    assert states["custom-path"]["exitCode"] == 0 and states["custom-path"]["message"].strip() == "done"
    assert states["fallback"]["exitCode"] == 2 and states["fallback"]["message"].strip() == "last words"
    assert not os.path.exists("/tmp/kubelora-result/msg") or os.path.getsize("/tmp/kubelora-result/msg") == 0


def test_unsupported_image_waits_with_clear_reason(cluster: LocalCluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "alien"},
        "spec": {"containers": [{"name": "main", "image": "docker.io/library/busybox:1.36", "command": ["true"]}]},
    }
    _create(cluster, f"/api/v1/namespaces/{namespace}/pods", pod)
    waiting = cluster.wait_for(
        lambda: (w := _waiting(cluster, namespace, "alien")).get("reason") == "UnsupportedImage" and w,
        timeout=10,
        what="UnsupportedImage",
    )
    assert "busybox" in waiting["message"] and "ghcr.io/kubelora/" in waiting["message"]
    got = _pod(cluster, namespace, "alien")
    assert got["status"]["phase"] == "Pending"
    assert got["status"]["containerStatuses"][0]["restartCount"] == 0
    cluster.kube.delete(f"/api/v1/namespaces/{namespace}/pods/alien")
    cluster.wait_for(lambda: not _pods(cluster, namespace, ""), timeout=10, what="pod deleted")


def test_restart_policy_always_restarts_with_backoff(cluster: LocalCluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "crashy"},
        "spec": {"containers": [{"name": "main", "image": "ghcr.io/kubelora/trainer:dev", "command": ["false"]}]},
    }
    _create(cluster, f"/api/v1/namespaces/{namespace}/pods", pod)
    status = cluster.wait_for(
        lambda: (s := _pod(cluster, namespace, "crashy")["status"]["containerStatuses"][0])["restartCount"] >= 2 and s,
        timeout=20,
        what="2 restarts",
    )
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert _pod(cluster, namespace, "crashy")["status"]["phase"] == "Running"


VOLUME_SCRIPT = """
import json, os, ssl, urllib.request, urllib.error
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{sa}/token").read()
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
ns = open(f"{sa}/namespace").read()
req = urllib.request.Request(f"https://{host}:{port}/api/v1/namespaces/{ns}/pods/{os.environ['MY_NAME']}",
                             headers={"Authorization": f"Bearer {token}"})
try:
    urllib.request.urlopen(req, context=ssl.create_default_context(cafile=f"{sa}/ca.crt"))
    api = "allowed"
except urllib.error.HTTPError as e:
    api = json.loads(e.read())["message"]
open("/mnt/pvc/data/out.txt", "w").write("written in the pod")
result = {
    "job": json.load(open("/etc/kubelora/job.json")),
    "init": open("/scratch/from-init").read(),
    "namespace": ns,
    "api": api,
    "env": {k: os.environ.get(k) for k in ("MY_NAME", "MY_SA", "MY_IP", "POD_IP", "SECRET", "CM", "CFG_mode",
                                           "GREETING", "OMP_NUM_THREADS")},
}
open("/dev/termination-log", "w").write(json.dumps(result))
"""


def test_volumes_and_env_are_visible_inside_the_container(cluster: LocalCluster, namespace: str) -> None:
    core = f"/api/v1/namespaces/{namespace}"
    cfg = {"job.json": '{"a": 1}', "mode": "fast"}
    _create(cluster, f"{core}/configmaps", {"metadata": {"name": "cfg"}, "data": cfg})
    _create(cluster, f"{core}/secrets", {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}})
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    _create(cluster, f"{core}/persistentvolumeclaims", {"metadata": {"name": "data"}, "spec": claim})

    def field(path: str) -> Obj:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "vols"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "job.json", "path": "job.json"}]}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "initContainers": [
                {
                    "name": "init",
                    "image": "ghcr.io/kubelora/trainer:dev",
                    "command": ["sh", "-c", "echo -n from-init > /scratch/from-init"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": "ghcr.io/kubelora/trainer:dev",
                    "command": ["python", "-c", VOLUME_SCRIPT],
                    "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                    "env": [
                        {"name": "MY_NAME", **field("metadata.name")},
                        {"name": "MY_SA", **field("spec.serviceAccountName")},
                        {"name": "MY_IP", **field("status.podIP")},
                        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                        {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                        {"name": "GREETING", "value": "hi $(MY_NAME) at $(POD_IP), $$(NOT_EXPANDED)"},
                    ],
                    "volumeMounts": [
                        {"name": "cfg", "mountPath": "/etc/kubelora", "readOnly": True},
                        {"name": "data", "mountPath": "/mnt/pvc/data"},
                        {"name": "scratch", "mountPath": "/scratch"},
                    ],
                }
            ],
        },
    }
    _create(cluster, f"{core}/pods", pod)
    got = cluster.wait_for(
        lambda: (p := _pod(cluster, namespace, "vols"))["status"].get("phase") in ("Succeeded", "Failed") and p,
        timeout=20,
        what="pod finished",
    )
    terminated = got["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, cluster.logs(namespace, "vols", "main")
    result = json.loads(terminated["message"])
    ip = got["status"]["podIP"]
    assert result["job"] == {"a": 1}
    assert result["init"] == "from-init"
    assert result["namespace"] == namespace
    assert f"system:serviceaccount:{namespace}:default" in result["api"]  # authenticated as the pod's SA
    assert result["env"] == {
        "MY_NAME": "vols",
        "MY_SA": "default",
        "MY_IP": ip,
        "POD_IP": ip,
        "SECRET": "s3cr3t",
        "CM": "fast",
        "CFG_mode": "fast",
        "GREETING": f"hi vols at {ip}, $(NOT_EXPANDED)",
        "OMP_NUM_THREADS": "1",
    }
    assert (cluster.pvc_dir(namespace, "data") / "out.txt").read_text() == "written in the pod"
    assert not os.path.exists("/mnt/pvc/data/out.txt")  # the host only has the empty mount point


def test_logs_cli(cluster: LocalCluster, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    _create(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs", _job("talk", ["echo", "hello logs"]))
    pod = cluster.wait_for(
        lambda: [p for p in _pods(cluster, namespace, "job-name=talk") if p["status"].get("phase") == "Succeeded"],
        timeout=20,
        what="pod Succeeded",
    )[0]
    rc = kubelora_local_main(["--state-dir", str(cluster.state_dir), "logs", namespace, pod["metadata"]["name"]])
    assert rc == 0
    assert capsys.readouterr().out == "hello logs\n"
