"""Kueue v0.17.0, the queue platform teams put in front of GPU Jobs, runs against the local cluster:
with one GPU of ClusterQueue quota a second GPU Job (plain, or a LoRAJob's training Job) waits
suspended until the first finishes, and Kueue's webhook suspends a queued Job at create time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubelora_local import build
from kubelora_local import kueue as local_kueue
from kubelora_local.kube import KubeError

from .conftest import SESSION_GPUS, LocalCluster
from .operator_fixture import OperatorProcess

pytestmark = pytest.mark.e2e

GPU = "nvidia.com/gpu"
GPU_QUOTA = SESSION_GPUS  # one Job's worth: the second must wait for Kueue, not for the scheduler
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture(scope="module")
def kueue(cluster: LocalCluster) -> Iterator[local_kueue.KueueHandle]:
    """The real Kueue controller manager (built from hack/kueue on first use), for this module only."""
    build.build(("kueue",))
    error = ""
    try:
        handle = local_kueue.start(cluster.info, cluster.state_dir / "kueue")
    except local_kueue.KueueError as e:
        error = str(e)
    if error:  # outside the except block: the log tail, no exception chain
        pytest.fail(error, pytrace=False)
    yield handle
    handle.stop()


def _cluster_queue(name: str, namespace: str) -> dict[str, Any]:
    quotas = {"cpu": "8", "memory": "8Gi", GPU: str(GPU_QUOTA)}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [
                {
                    "coveredResources": list(quotas),
                    "flavors": [
                        {"name": name, "resources": [{"name": r, "nominalQuota": q} for r, q in quotas.items()]}
                    ],
                }
            ],
        },
    }


def _gone(cluster: LocalCluster, path: str) -> bool:
    try:
        cluster.kube.get(path)
    except KubeError as e:
        return e.status == 404
    return False


@pytest.fixture
def queue(cluster: LocalCluster, namespace: str, kueue: local_kueue.KueueHandle) -> Iterator[str]:
    """ResourceFlavor + ClusterQueue (named after the namespace) + LocalQueue `gpus`; yields the LocalQueue.

    Teardown runs while Kueue still does: Workloads, ClusterQueues and ResourceFlavors carry its
    finalizers, which only Kueue removes.
    """
    flavors, cqs = f"{KUEUE_API}/resourceflavors", f"{KUEUE_API}/clusterqueues"
    lqs = f"{KUEUE_API}/namespaces/{namespace}/localqueues"
    cluster.kube.create(
        flavors, {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": namespace}}
    )
    cluster.kube.create(cqs, _cluster_queue(namespace, namespace))
    cluster.kube.create(
        lqs,
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "gpus"},
            "spec": {"clusterQueue": namespace},
        },
    )
    yield "gpus"
    cluster.kube.delete(f"/apis/batch/v1/namespaces/{namespace}/jobs", {"propagationPolicy": "Background"})
    workloads = f"{KUEUE_API}/namespaces/{namespace}/workloads"
    cluster.wait_for(lambda: not cluster.kube.get(workloads)["items"], timeout=60, what="the Workloads to go")
    for path in (f"{lqs}/gpus", f"{cqs}/{namespace}", f"{flavors}/{namespace}"):
        cluster.kube.delete(path)
        cluster.wait_for(lambda p=path: _gone(cluster, p), timeout=30, what=f"{path} to go")


def _job(name: str, queue: str, image: str, command: list[str], gpus: int, suspend: bool | None) -> dict[str, Any]:
    resources = {"cpu": "100m", "memory": "64Mi", **({GPU: str(gpus)} if gpus else {})}
    container = {
        "name": "main",
        "image": image,
        "command": command,
        "resources": {"requests": resources, "limits": {GPU: str(gpus)} if gpus else {}},
    }
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
    }
    if suspend is not None:
        spec["suspend"] = suspend
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
        "spec": spec,
    }


def _gpu_job(name: str, queue: str) -> dict[str, Any]:
    return _job(name, queue, "ghcr.io/kubelora/trainer:dev", ["sleep", "6"], gpus=1, suspend=True)


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def _true(obj: dict[str, Any], kind: str) -> bool:
    return _condition(obj, kind).get("status") == "True"


class Jobs:
    """Reads of one namespace's Jobs, their pods and the Workloads Kueue made for them."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.kube = cluster.kube
        self.jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
        self.pods = f"/api/v1/namespaces/{namespace}/pods"
        self.workloads = f"{KUEUE_API}/namespaces/{namespace}/workloads"

    def job(self, name: str) -> dict[str, Any]:
        return self.kube.get(f"{self.jobs}/{name}")

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        return list(self.kube.get(self.pods, labelSelector=f"job-name={name}")["items"])

    def workload(self, name: str) -> dict[str, Any] | None:
        uid = self.job(name)["metadata"]["uid"]
        items = self.kube.get(self.workloads, labelSelector=f"kueue.x-k8s.io/job-uid={uid}")["items"]
        return items[0] if items else None

    def admitted(self, name: str) -> dict[str, Any] | None:
        wl = self.workload(name)
        return wl if wl and _true(wl, "Admitted") else None

    def running(self, name: str) -> bool:
        return any(p.get("status", {}).get("phase") == "Running" for p in self.pods_of(name))


def test_second_gpu_job_waits_in_the_queue_until_the_first_finishes(
    cluster: LocalCluster, namespace: str, queue: str
) -> None:
    j = Jobs(cluster, namespace)
    cluster.kube.create(j.jobs, _gpu_job("first", queue))
    first_wl = cluster.wait_for(lambda: j.admitted("first"), timeout=30, what="Kueue to admit the first Job")
    assert first_wl["status"]["admission"]["clusterQueue"] == namespace
    cluster.wait_for(lambda: j.job("first")["spec"]["suspend"] is False, timeout=15, what="Kueue to unsuspend it")
    cluster.wait_for(lambda: j.running("first"), timeout=30, what="the first Job's pod to run")

    cluster.kube.create(j.jobs, _gpu_job("second", queue))
    # QuotaReserved appears once Kueue's scheduler has tried the Workload: False/Pending, or True if it fit.
    second_wl = cluster.wait_for(
        lambda: (wl := j.workload("second")) and _condition(wl, "QuotaReserved") and wl,
        timeout=30,
        what="Kueue's verdict on the second Job's Workload",
    )
    reserved = _condition(second_wl, "QuotaReserved")
    assert (reserved["status"], reserved["reason"]) == ("False", "Pending"), reserved
    assert GPU in reserved["message"] and "quota" in reserved["message"], reserved["message"]
    assert not _true(second_wl, "Admitted")
    assert j.job("second")["spec"]["suspend"] is True
    assert j.pods_of("second") == []
    assert j.running("first"), "the first Job finished before the second was seen waiting: lengthen its sleep"
    cluster.wait_for(
        lambda: (
            (cq := cluster.kube.get(f"{KUEUE_API}/clusterqueues/{namespace}")["status"])
            and (cq.get("admittedWorkloads"), cq.get("pendingWorkloads")) == (1, 1)
        ),
        timeout=15,
        what="the ClusterQueue to count one admitted and one pending Workload",
    )

    cluster.wait_for(lambda: _true(j.job("first"), "Complete"), timeout=60, what="the first Job to complete")
    second_wl = cluster.wait_for(lambda: j.admitted("second"), timeout=60, what="Kueue to admit the second Job")
    first_wl = j.workload("first")
    assert first_wl is not None and _true(first_wl, "Finished")
    # Admitted only after the first released its GPU (RFC 3339 seconds in UTC compare as strings).
    assert (
        _condition(second_wl, "Admitted")["lastTransitionTime"]
        >= _condition(first_wl, "Finished")["lastTransitionTime"]
    )
    cluster.wait_for(lambda: _true(j.job("second"), "Complete"), timeout=60, what="the second Job to complete")
    assert [p["spec"]["nodeName"] for p in j.pods_of("second")] == ["local-node"]


def test_kueue_webhook_suspends_a_queued_job_at_create(cluster: LocalCluster, namespace: str, queue: str) -> None:
    j = Jobs(cluster, namespace)
    job = _job("unsuspended", queue, "ghcr.io/kubelora/trainer:dev", ["true"], gpus=0, suspend=None)
    created = cluster.kube.create(j.jobs, job)
    assert created["spec"]["suspend"] is True  # Kueue's mutating webhook, before the Job controller saw it
    cluster.wait_for(lambda: j.admitted("unsuspended"), timeout=30, what="Kueue to admit it")
    cluster.wait_for(lambda: _true(j.job("unsuspended"), "Complete"), timeout=30, what="the admitted Job to complete")


def test_second_lorajob_waits_queued_until_the_first_finishes(
    cluster: LocalCluster, namespace: str, queue: str, operator: OperatorProcess
) -> None:
    """Two 1-GPU LoRAJobs naming the LocalQueue: the second shows Queued while Kueue holds it, then runs."""
    from .test_lorajob import make_env, spec

    env = make_env(cluster, namespace, operator)
    gpu_run = {"resources": {"gpus": 1, "requests": {"cpu": "100m", "memory": "64Mi"}}, "queueName": queue}
    env.create("first", spec("first", max_steps=60, **gpu_run))
    env.wait_phase("first", "Running", timeout=120)
    env.create("second", spec("second", max_steps=5, **gpu_run))
    queued = env.wait_phase("second", "Queued", timeout=120)
    assert queue in queued["message"]
    assert env.status("first")["phase"] == "Running", "the first finished before the second was seen queued"
    [job] = env.children("jobs", "second", "trainer")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][QUEUE_LABEL] == queue

    first = env.wait_phase("first", "Succeeded", "Failed")
    assert first["phase"] == "Succeeded", first.get("message")
    second = env.wait_phase("second", "Succeeded", "Failed")
    assert second["phase"] == "Succeeded", second.get("message")
    j = Jobs(cluster, namespace)
    first_wl, second_wl = j.workload("first-train-1"), j.workload("second-train-1")
    assert first_wl is not None and second_wl is not None
    assert _condition(second_wl, "Admitted")["lastTransitionTime"] >= _condition(first_wl, "Finished")[
        "lastTransitionTime"
    ]
