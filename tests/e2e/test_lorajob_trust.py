"""What a platform team checks before trusting the operator, on the real local cluster: the verdict
kstatus (Flux, kpt) gives each LoRAJob phase, the scheduler's reason for a pod that cannot start, a
refused create surfaced as Stalled with one Warning Event, delete-and-recreate under the same name,
and a preempted (evicted) training pod that resumes without counting a failure."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from kubelora_local import build
from kubelora_local.kube import KubeError

from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_lorajob import Env, make_env, spec

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Env:
    return make_env(cluster, namespace, operator)


@pytest.fixture(scope="module")
def kstatus() -> str:
    return str(build.build(("kstatus",))["kstatus"])


def verdict(binary: str, obj: Obj) -> str:
    out = subprocess.run([binary], input=json.dumps(obj), capture_output=True, text=True, check=True, timeout=30)
    return str(json.loads(out.stdout)["status"])


def condition(status: Obj, kind: str) -> Obj:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def test_kstatus_verdict_for_each_phase(env: Env, kstatus: str) -> None:
    data = env.cluster.pvc_dir(env.ns, "data")
    (data / "broken.jsonl").write_text('{"messages": [\n')
    env.create("ks-long", spec("ks-long", max_steps=400))
    env.create("ks-ok", spec("ks-ok", max_steps=5))
    env.create("ks-broken", spec("ks-broken", dataset={"uri": "pvc://data/broken.jsonl"}))
    env.create("ks-gpus", spec("ks-gpus", resources={"gpus": 2}))  # the node has one

    seen = env.wait_phase("ks-long", "Validating", "Running", timeout=60)
    assert verdict(kstatus, env.get("ks-long")) == "InProgress", seen
    env.cluster.wait_for(lambda: (env.status("ks-long").get("progress") or {}).get("step"), 180, "training steps")
    assert verdict(kstatus, env.get("ks-long")) == "InProgress"

    env.wait_phase("ks-ok", "Succeeded")
    assert verdict(kstatus, env.get("ks-ok")) == "Current"

    failed = env.wait_phase("ks-broken", "Failed", timeout=120)
    assert verdict(kstatus, env.get("ks-broken")) == "Failed"
    assert condition(failed, "Stalled")["status"] == "True"

    def unschedulable() -> Obj | None:
        status = env.status("ks-gpus")
        return status if condition(status, "Ready").get("reason") == "Unschedulable" else None

    status = env.cluster.wait_for(unschedulable, 120, "the scheduler's verdict in the LoRAJob status")
    assert "Insufficient nvidia.com/gpu" in status["message"], status["message"]
    assert status["phase"] == "Running" and verdict(kstatus, env.get("ks-gpus")) == "InProgress"

    env.cluster.kube.merge_patch(env.path("ks-long"), {"spec": {"suspend": True}})
    env.cluster.wait_for(
        lambda: (o := env.get("ks-long"))["status"].get("phase") == "Suspended"
        and o["status"].get("observedGeneration") == o["metadata"]["generation"],
        60,
        "Suspended",
    )
    assert verdict(kstatus, env.get("ks-long")) == "Current", "suspended is where the spec asks it to be"

    # A spec only the operator's model rejects (the CRD's CEL rules refuse the others at create) is Failed.
    env.create("ks-invalid", spec("ks-invalid", dataset={"uri": "pvc://data/../chat.jsonl"}))
    env.wait_phase("ks-invalid", "Failed", timeout=30)
    assert verdict(kstatus, env.get("ks-invalid")) == "Failed"


def test_refused_create_is_stalled_with_one_warning_event(env: Env) -> None:
    """A ResourceQuota that allows no Jobs: the API server answers 403 to the operator's create."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
             "spec": {"hard": {"count/jobs.batch": "0"}}}
    env.cluster.kube.create(f"/api/v1/namespaces/{env.ns}/resourcequotas", quota)
    quotas = f"/api/v1/namespaces/{env.ns}/resourcequotas"
    env.cluster.wait_for(lambda: env.cluster.kube.get(f"{quotas}/no-jobs").get("status", {}).get("hard"), 30,
                         "the quota controller to count")
    env.create("quota", spec("quota"))

    def stalled() -> Obj | None:
        status = env.status("quota")
        return status if condition(status, "Stalled").get("status") == "True" else None

    status = env.cluster.wait_for(stalled, 60, "Stalled=True")
    cond = condition(status, "Stalled")
    assert cond["reason"] == "Forbidden" and "exceeded quota" in cond["message"], cond
    assert "validationJobName" not in status
    env.cluster.wait_for(lambda: any(e["reason"] == "Forbidden" for e in env.events("quota")), 15, "the Event")
    # Retries (30 s apart) neither repeat the Event nor write the status again.
    version = env.get("quota")["metadata"]["resourceVersion"]
    [event] = [e for e in env.events("quota") if e["reason"] == "Forbidden"]
    assert event["type"] == "Warning" and event.get("count", 1) == 1

    env.cluster.kube.delete(f"{quotas}/no-jobs")
    status = env.wait_phase("quota", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded" and condition(status, "Stalled")["status"] == "False"
    assert env.get("quota")["metadata"]["resourceVersion"] != version


def test_recreate_under_the_same_name_takes_over_nothing(env: Env) -> None:
    env.create("again", spec("again", max_steps=400))
    env.wait_phase("again", "Running", timeout=120)
    old_uid = env.get("again")["metadata"]["uid"]
    env.cluster.kube.delete(env.path("again"))
    env.cluster.wait_for(lambda: _gone(env, "again"), 30, "the LoRAJob to go")
    data = env.cluster.pvc_dir(env.ns, "data")
    rows = (data / "chat.jsonl").read_text().splitlines()
    (data / "bad.jsonl").write_text("\n".join([rows[0], '{"oops": 1}', *rows[1:5]]) + "\n")
    env.create("again", spec("again", dataset={"uri": "pvc://data/bad.jsonl"}))
    new_uid = env.get("again")["metadata"]["uid"]
    assert new_uid != old_uid
    status = env.wait_phase("again", "Failed", "Succeeded", timeout=180)
    assert status["phase"] == "Failed" and "line 2" in status["message"], status["message"]
    assert condition(status, "Validated")["reason"] == "InvalidDataset"
    for kind in ("jobs",):
        for child in env.children(kind, "again"):
            owners = {r["uid"] for r in child["metadata"].get("ownerReferences") or []}
            assert new_uid in owners or child["metadata"].get("deletionTimestamp"), child["metadata"]


def _gone(env: Env, name: str) -> bool:
    try:
        env.get(name)
    except KubeError as e:
        return e.status == 404
    return False


def test_evicted_training_pod_resumes_without_counting_a_failure(env: Env) -> None:
    env.create("evict", spec("evict", max_steps=150))

    def checkpointed() -> bool:
        status = env.status("evict")
        return status.get("phase") == "Running" and bool((status.get("progress") or {}).get("lastCheckpoint"))

    env.cluster.wait_for(checkpointed, 300, "a checkpoint while training")
    [pod] = [p for p in env.children("pods", "evict", "trainer") if p["status"].get("phase") == "Running"]
    name = pod["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": env.ns}}
    env.cluster.kube.create(f"/api/v1/namespaces/{env.ns}/pods/{name}/eviction", eviction)
    status = env.wait_phase("evict", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    [job] = env.children("jobs", "evict", "trainer")
    assert not job["status"].get("failed"), f"an eviction is not a failed attempt: {job['status']}"
    pods = sorted(env.children("pods", "evict", "trainer"), key=lambda p: p["metadata"]["creationTimestamp"])
    assert "resuming from" in env.pod_log(pods[-1])
