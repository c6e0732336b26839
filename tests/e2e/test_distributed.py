"""Multi-node training on the local cluster: a LoRAJob with ``nodes: 2`` (CPU, one process per node) runs as
an Indexed Job of two pods that find each other by DNS (``<job>-0.<service>``, the headless Service the
operator owns), train with DDP over gloo, and publish one adapter; killing one pod mid-run (every process
of it, as a lost node) fails the group, the Job starts both pods again and they resume from the newest
checkpoint."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator

import pytest

from kubelora.api.runtime import MANIFEST_FILE
from kubelora_local.runner.sandbox import descendants, signal_group

from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_lorajob import RUN_TIMEOUT, Env, Obj, adapter_dir, make_env, spec

pytestmark = pytest.mark.e2e

INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Iterator[Env]:
    yield make_env(cluster, namespace, operator)


def two_nodes(name: str, max_steps: int) -> Obj:
    body = spec(name, max_steps=max_steps, resources={"gpus": 0, "nodes": 2}, backoffLimit=3,
                dataset={"uri": "pvc://data/chat.jsonl", "evalSplit": 0})
    body["training"].update(batchSize=2, saveSteps=10)
    return body


def kill_node(env: Env, pod: Obj) -> None:
    """SIGKILL every process of the pod (launcher and torchrun workers), as a crashed node would."""
    meta = pod["metadata"]
    pid_file = (env.cluster.state_dir / "pods" / env.ns / f"{meta['name']}-{meta['uid'][:8]}" / "containers"
                / "trainer" / "pid")
    pid = int(pid_file.read_text().split()[0])
    assert descendants(pid), "torchrun's workers run below the launcher"
    signal_group(pid, signal.SIGKILL)  # the group and every descendant, as the runner kills a container


def running_pods(env: Env, name: str) -> list[Obj]:
    return [p for p in env.children("pods", name, "trainer") if p["status"].get("phase") == "Running"]


def test_two_nodes_rendezvous_by_dns_train_publish_and_restart_together(env: Env) -> None:
    name = "pair"
    env.create(name, two_nodes(name, max_steps=400))

    def checkpointed() -> Obj | None:
        status = env.status(name)
        progress = status.get("progress") or {}
        return status if status.get("phase") == "Running" and progress.get("lastCheckpoint") else None

    env.cluster.wait_for(checkpointed, RUN_TIMEOUT, "a checkpoint while two nodes train")
    [job] = env.children("jobs", name, "trainer")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    svc_name = job["spec"]["template"]["spec"]["subdomain"]
    svc = env.cluster.kube.get(f"/api/v1/namespaces/{env.ns}/services/{svc_name}")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["ownerReferences"][0]["uid"] == env.get(name)["metadata"]["uid"]
    first = {p["metadata"]["annotations"][INDEX]: p for p in running_pods(env, name)}
    assert set(first) == {"0", "1"}
    jname = job["metadata"]["name"]
    assert {p["spec"]["hostname"] for p in first.values()} == {f"{jname}-0", f"{jname}-1"}
    log1 = env.pod_log(first["1"])
    assert f"--rdzv-endpoint={jname}-0.{svc_name}:29400" in log1 and "--node-rank=1" in log1

    kill_node(env, first["1"])
    status = env.wait_phase(name, "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["attempts"] == 2, "one lost node is one more attempt of the whole group"

    pods = env.children("pods", name, "trainer")
    again = [p for p in pods if p["metadata"]["name"] not in {q["metadata"]["name"] for q in first.values()}]
    assert sorted(p["metadata"]["annotations"][INDEX] for p in again) == ["0", "1"], "both nodes restarted"
    for pod in again:
        log = env.pod_log(pod)
        assert "resuming from" in log and re.search(r"/checkpoints/rev-\d+/checkpoint-", log), log[-2000:]
    # One adapter, from the resumed run, verifiable and published once.
    folder = adapter_dir(env, status)
    assert (folder / MANIFEST_FILE).is_file() and len(list(folder.parent.rglob(MANIFEST_FILE))) == 1
    assert status["progress"]["step"] == 400 and status["progress"]["adapter"] == status["adapter"]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 10
    assert manifest["digest"] == status["adapter"]["digest"]
