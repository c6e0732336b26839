"""Faults of the control plane on the real local cluster, each asserting the outcome and that nothing was lost:
the operator SIGKILLed in each phase of a run (no duplicate Job, status converges on the true outcome) and the
API server restarted mid-run (the trainer's progress and the operator's watches come back on their own).

The trainer pod killed or evicted mid-run is in tests/e2e/test_lorajob.py and test_lorajob_trust.py
(resume from the last checkpoint, an eviction not counted as a failure).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kubelora_local import cluster as local_cluster
from tests.e2e.cluster_fixture import LocalCluster
from tests.e2e.operator_fixture import OperatorProcess
from tests.e2e.test_lorajob import Env, make_env, spec

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Iterator[Env]:
    yield make_env(cluster, namespace, operator)
    if not operator.running:
        operator.start()


def job_names(env: Env, name: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in env.children("jobs", name))


@pytest.mark.parametrize("phase", ["Pending", "Validating", "Running"])
def test_operator_killed_in_each_phase(env: Env, phase: str) -> None:
    name = f"kill-{phase.lower()}"
    if phase == "Pending":
        env.operator.kill()  # the object exists before any operator saw it
        env.create(name, spec(name, max_steps=8))
    else:
        env.create(name, spec(name, max_steps=8 if phase == "Validating" else 60))
        env.wait_phase(name, phase, timeout=120)
        env.operator.kill()
    time.sleep(3)  # the world moves on without it: pre-flight or training pods keep running
    env.operator.start()
    status = env.wait_phase(name, "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert job_names(env, name) == [f"{name}-train-1", f"{name}-validate-1"], "a Job was duplicated"
    assert status["observedGeneration"] == env.get(name)["metadata"]["generation"]
    assert status["adapter"]["uri"] == f"pvc://adapters/{name}/rev-1"


def test_api_server_restarted_mid_run(env: Env) -> None:
    env.create("outage", spec("outage", max_steps=60))
    env.cluster.wait_for(lambda: (env.status("outage").get("progress") or {}).get("step"), 240, "training steps")
    local_cluster.restart_apiserver(env.cluster.state_dir, down_seconds=5)
    step_after = (env.status("outage").get("progress") or {}).get("step", 0)

    status = env.wait_phase("outage", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["progress"]["step"] >= step_after and status["progress"]["percent"] == 100
    assert job_names(env, "outage") == ["outage-train-1", "outage-validate-1"]
    assert env.operator.healthy(), "the operator died with the API server"

    # The operator's watches came back: a LoRAJob created after the outage is reconciled.
    env.create("after", spec("after", dataset={"uri": "pvc://data/../chat.jsonl"}))
    assert "'..' is not allowed" in env.wait_phase("after", "Failed", timeout=60)["message"]
