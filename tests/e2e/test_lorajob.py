"""LoRAJob end to end on the local cluster: the real operator, the real trainer, a tiny model on CPU.

What users rely on: a run goes pre-flight -> Job -> trainer and publishes an adapter whose digest
matches its files, with live progress on the way; bad input fails early with the line number and
no training Job; deleting the LoRAJob removes its Jobs and pods; an operator crash creates no
duplicate Job; a killed training pod is retried and resumes from its checkpoint; suspend keeps
checkpoints and resume continues from them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.digest import adapter_files, digest_of, file_sha256
from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

from .conftest import LocalCluster
from .operator_fixture import OperatorProcess

pytestmark = pytest.mark.e2e

Obj = dict[str, Any]
GROUP_PATH = "/apis/kubelora.io/v1alpha1/namespaces"
RUN_TIMEOUT = 300.0


def spec(name: str, max_steps: int = 20, **overrides: Any) -> Obj:
    """A CPU LoRA run of the tiny model; output under pvc://adapters/<name>."""
    out: Obj = {
        "baseModel": {"uri": "pvc://models/tiny"},
        "dataset": {"uri": "pvc://data/chat.jsonl", "evalSplit": 0.1},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "targetModules": ["all-linear"]},
        "training": {
            "maxSteps": max_steps,
            "saveSteps": 5,
            "evalSteps": 5,
            "batchSize": 4,
            "gradientAccumulationSteps": 1,
            "learningRate": 5e-3,
            "maxSeqLength": 128,
            "optimizer": "adamw_torch",
            "gradientCheckpointing": False,
        },
        "resources": {"gpus": 0},
        "output": {"uri": f"pvc://adapters/{name}"},
        "backoffLimit": 2,
    }
    out.update(overrides)
    return out


@dataclass
class Env:
    cluster: LocalCluster
    ns: str
    operator: OperatorProcess

    def path(self, name: str) -> str:
        return f"{GROUP_PATH}/{self.ns}/lorajobs/{name}"

    def create(self, name: str, body_spec: Obj) -> Obj:
        body = {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "metadata": {"name": name}, "spec": body_spec}
        created: Obj = self.cluster.kube.create(f"{GROUP_PATH}/{self.ns}/lorajobs", body)
        return created

    def get(self, name: str) -> Obj:
        obj: Obj = self.cluster.kube.get(self.path(name))
        return obj

    def status(self, name: str) -> Obj:
        return self.get(name).get("status") or {}

    def wait_phase(self, name: str, *phases: str, timeout: float = RUN_TIMEOUT) -> Obj:
        def check() -> Obj | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        try:
            result: Obj = self.cluster.wait_for(check, timeout, f"LoRAJob {name} phase in {phases}")
        except BaseException:
            print(f"status: {json.dumps(self.status(name), indent=1)}\n--- operator ---\n{self.operator.tail(60)}")
            raise
        return result

    def children(self, kind: str, name: str, component: str | None = None) -> list[Obj]:
        selector = f"kubelora.io/lorajob={name}" + (f",app.kubernetes.io/component={component}" if component else "")
        prefix = "/apis/batch/v1" if kind == "jobs" else "/api/v1"
        items: list[Obj] = self.cluster.kube.get(f"{prefix}/namespaces/{self.ns}/{kind}", labelSelector=selector)[
            "items"
        ]
        return items

    def events(self, name: str) -> list[Obj]:
        items: list[Obj] = self.cluster.kube.get(
            f"/api/v1/namespaces/{self.ns}/events", fieldSelector=f"involvedObject.name={name}"
        )["items"]
        return sorted(items, key=lambda e: e.get("firstTimestamp") or "")

    def pod_log(self, pod: Obj) -> str:
        return self.cluster.logs(self.ns, pod["metadata"]["name"], "trainer")


def make_env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Env:
    """A namespace with the tiny model on PVC ``models``, a chat dataset on PVC ``data`` and PVC ``adapters``."""
    build_tiny_model(cluster.pvc_dir(namespace, "models") / "tiny")
    write_chat_dataset(cluster.pvc_dir(namespace, "data") / "chat.jsonl", n=64)
    cluster.pvc_dir(namespace, "adapters")
    return Env(cluster, namespace, operator)


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Iterator[Env]:
    yield make_env(cluster, namespace, operator)


def adapter_dir(env: Env, status: Obj) -> Path:
    uri = status["adapter"]["uri"]
    assert uri.startswith("pvc://adapters/")
    return env.cluster.pvc_dir(env.ns, "adapters") / uri.removeprefix("pvc://adapters/")


def kill_pod_processes(env: Env, pod: Obj) -> None:
    """SIGKILL the trainer's process group, as an OOM kill or a node crash would."""
    meta = pod["metadata"]
    pid_file = (
        env.cluster.state_dir / "pods" / env.ns / f"{meta['name']}-{meta['uid'][:8]}" / "containers" / "trainer" / "pid"
    )
    pid = int(pid_file.read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)


def test_trains_publishes_and_reports_progress(env: Env) -> None:
    env.create("bot", spec("bot"))
    phases, progress_while_running = [], []
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        status = env.status("bot")
        if status.get("phase") and (not phases or phases[-1] != status["phase"]):
            phases.append(status["phase"])
        if status.get("phase") == "Running" and (status.get("progress") or {}).get("step"):
            progress_while_running.append(status["progress"])
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.1)
    status = env.wait_phase("bot", "Succeeded", timeout=1)
    assert phases[0] in ("Validating", "Pending") and "Running" in phases, phases
    assert progress_while_running, "no live progress was published while the job ran"
    assert {"step", "totalSteps", "percent"} <= set(progress_while_running[-1])
    assert status["progress"]["percent"] == 100

    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Succeeded"]["reason"] == "Completed"
    assert conditions["Validated"]["message"].startswith("pre-flight passed")
    assert status["observedGeneration"] == 1 and status["attempts"] == 1 and status["revision"] == 1

    # The published digest is the digest of the files on the claim, and the manifest agrees.
    folder = adapter_dir(env, status)
    files = {rel: file_sha256(folder / rel) for rel in adapter_files(folder)}
    assert status["adapter"]["digest"] == digest_of(files)
    manifest = json.loads((folder / "kubelora-manifest.json").read_text())
    assert manifest["digest"] == status["adapter"]["digest"] and manifest["files"] == files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)

    assert [j["metadata"]["name"] for j in env.children("jobs", "bot")] == ["bot-train-1", "bot-validate-1"]
    # kopf posts Events asynchronously after the status patch, so the last one may trail it a little.
    env.cluster.wait_for(
        lambda: {"Succeeded"} <= {e["reason"] for e in env.events("bot")}, timeout=15, what="the Succeeded event"
    )
    reasons = [e["reason"] for e in env.events("bot")]
    assert {"Validating", "Running", "Succeeded"} <= set(reasons), reasons

    # Steady state: nothing writes the object any more.
    version = env.get("bot")["metadata"]["resourceVersion"]
    time.sleep(3)
    assert env.get("bot")["metadata"]["resourceVersion"] == version


def test_bad_dataset_fails_preflight_with_line_number(env: Env) -> None:
    data = env.cluster.pvc_dir(env.ns, "data") / "broken.jsonl"
    rows = (env.cluster.pvc_dir(env.ns, "data") / "chat.jsonl").read_text().splitlines()
    data.write_text("\n".join([rows[0], rows[1], '{"messages": [{"role": "user"', *rows[2:10]]) + "\n")
    env.create("broken", spec("broken", dataset={"uri": "pvc://data/broken.jsonl"}))
    status = env.wait_phase("broken", "Failed", "Succeeded", timeout=120)
    assert status["phase"] == "Failed"
    validated = {c["type"]: c for c in status["conditions"]}["Validated"]
    assert validated["status"] == "False" and validated["reason"] == "InvalidDataset"
    assert "line 3" in status["message"], status["message"]
    assert env.children("jobs", "broken", "trainer") == []
    assert "jobName" not in status
    # kopf posts Events from a queue after the status patch: wait for it rather than race it.
    warnings = env.cluster.wait_for(lambda: [e for e in env.events("broken") if e["type"] == "Warning"], 30,
                                    "the Warning Event")
    assert warnings[-1]["reason"] == "Failed"


def test_invalid_spec_fails_without_children(env: Env) -> None:
    # The CRD's pattern admits it, the URI parser does not (the CEL rules' cases never land: test_cel_rules.py).
    env.create("invalid", spec("invalid", dataset={"uri": "pvc://data/../chat.jsonl"}))
    status = env.wait_phase("invalid", "Failed", timeout=30)
    assert "spec.dataset.uri: 'pvc://data/../chat.jsonl': '..' is not allowed in a path" in status["message"]
    time.sleep(1)
    assert env.children("jobs", "invalid") == []


def test_delete_removes_jobs_and_pods(env: Env) -> None:
    env.create("gone", spec("gone", max_steps=5000))
    env.wait_phase("gone", "Running", timeout=120)
    env.cluster.wait_for(
        lambda: [p for p in env.children("pods", "gone", "trainer") if p.get("status", {}).get("phase") == "Running"],
        120,
        "a running trainer pod",
    )
    env.cluster.kube.delete(env.path("gone"))
    env.cluster.wait_for(
        lambda: not env.children("jobs", "gone") and not env.children("pods", "gone"),
        90,
        "garbage collection of the Jobs and pods",
    )
    env.cluster.wait_for(
        lambda: (
            not env.cluster.kube.get(
                f"/api/v1/namespaces/{env.ns}/configmaps", labelSelector="kubelora.io/lorajob=gone"
            )["items"]
        ),
        30,
        "garbage collection of the ConfigMap",
    )


def test_operator_crash_creates_no_duplicate_job(env: Env) -> None:
    env.create("crash", spec("crash", max_steps=120))
    try:
        env.wait_phase("crash", "Validating", timeout=60)
        env.operator.kill()  # while pre-flight runs: the training Job is created by the next operator
        env.cluster.wait_for(
            lambda: all(j.get("status", {}).get("succeeded") for j in env.children("jobs", "crash", "preflight")),
            120,
            "pre-flight to finish",
        )
        env.operator.start()
        env.wait_phase("crash", "Running", timeout=60)
        env.operator.kill()  # while training runs: the next operator must adopt, not duplicate
        time.sleep(2)
        env.operator.start()
    finally:
        if not env.operator.running:
            env.operator.start()
    status = env.wait_phase("crash", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert [j["metadata"]["name"] for j in env.children("jobs", "crash")] == ["crash-train-1", "crash-validate-1"]
    assert status["observedGeneration"] == env.get("crash")["metadata"]["generation"]


def test_killed_training_pod_resumes_from_checkpoint(env: Env) -> None:
    env.create("retry", spec("retry", max_steps=150))

    def checkpointed() -> Obj | None:
        status = env.status("retry")
        progress = status.get("progress") or {}
        return status if status.get("phase") == "Running" and progress.get("lastCheckpoint") else None

    env.cluster.wait_for(checkpointed, RUN_TIMEOUT, "a checkpoint while training")
    [first] = [p for p in env.children("pods", "retry", "trainer") if p["status"].get("phase") == "Running"]
    kill_pod_processes(env, first)
    status = env.wait_phase("retry", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["attempts"] == 2
    pods = sorted(env.children("pods", "retry", "trainer"), key=lambda p: p["metadata"]["creationTimestamp"])
    assert len(pods) == 2 and pods[0]["metadata"]["name"] == first["metadata"]["name"]
    assert "resuming from" in env.pod_log(pods[1]) and "checkpoint-" in env.pod_log(pods[1])


def test_suspend_keeps_checkpoints_and_resume_continues(env: Env) -> None:
    env.create("pause", spec("pause", max_steps=150))

    def checkpointed() -> bool:
        status = env.status("pause")
        return status.get("phase") == "Running" and bool((status.get("progress") or {}).get("lastCheckpoint"))

    env.cluster.wait_for(checkpointed, RUN_TIMEOUT, "a checkpoint while training")
    env.cluster.kube.merge_patch(env.path("pause"), {"spec": {"suspend": True}})
    status = env.wait_phase("pause", "Suspended", timeout=60)
    env.cluster.wait_for(lambda: not env.children("pods", "pause", "trainer"), 60, "the Job controller to stop the pod")
    [job] = env.children("jobs", "pause", "trainer")
    assert job["spec"]["suspend"] is True, "suspend is the Job's own spec.suspend: the Job and its history stay"
    assert "checkpoint" in status["message"]
    env.cluster.kube.merge_patch(env.path("pause"), {"spec": {"suspend": False}})
    status = env.wait_phase("pause", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["jobName"] == "pause-train-1", "the same Job resumed"
    [job] = env.children("jobs", "pause", "trainer")
    assert not job["status"].get("failed"), "a graceful stop (exit 143) is not a failed attempt"
    [pod] = env.children("pods", "pause", "trainer")
    assert "resuming from" in env.pod_log(pod)
