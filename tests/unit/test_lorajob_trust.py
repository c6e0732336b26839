"""LoRAJob behaviours a platform team relies on: children by owner uid, honest Ready/Reconciling/Stalled,
pod blockers in the status, Kueue queueing, the Job failure policy, and results that outlive pods."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.reconcile.lorajob_observed import pod_blocker
from kubelora.resources.lorajob_jobs import pod_failure_policy, training_job

from .test_lorajob_world import (
    ADAPTER,
    LATER,
    SETTINGS,
    SPEC,
    World,
    cond,
    config,
    job,
    merge,
    names,
    pod,
    result,
    running_world,
    vjob,
    vpod,
)


def verdict(plan: Any) -> tuple[str, str, str]:
    return tuple(cond(plan, t)["status"] for t in ("Ready", "Reconciling", "Stalled"))  # type: ignore[return-value]


def test_children_of_an_earlier_lorajob_of_the_same_name_are_ignored() -> None:
    """The old incarnation's passed pre-flight must not stand in for the new one's."""
    world = World(jobs=[vjob(succeeded=1, condition="Complete", owner="uid-old")],
                  pods=[vpod("Succeeded", exit_code=0, message=result(validation=True))])
    world.pods[0]["metadata"]["ownerReferences"][0]["uid"] = "uid-of-the-old-validate-job"
    plan = world.reconcile()
    assert plan.phase == "Validating"
    assert cond(plan, "Validated")["status"] == "Unknown"
    assert names(plan) == ["create ConfigMap/bot-trainer-1", "create Job/bot-validate-1"]


def test_pods_count_only_through_their_owning_job() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1))
    stray = pod("p-old", "bot-train-1", "Failed", exit_code=1, message="old run")
    stray["metadata"]["ownerReferences"][0]["uid"] = "uid-another-job"
    world.put(stray)
    plan = world.reconcile()
    assert plan.phase == "Running" and "old run" not in plan.message


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        pytest.param("new", ("False", "True", "False"), id="validating"),
        pytest.param("running", ("False", "True", "False"), id="training"),
        pytest.param("succeeded", ("True", "False", "False"), id="succeeded"),
        pytest.param("failed", ("False", "False", "True"), id="failed"),
        pytest.param("suspended", ("True", "False", "False"), id="suspended"),
        pytest.param("bad-spec", ("False", "False", "True"), id="bad-spec"),
    ],
)
def test_ready_reconciling_stalled_per_phase(step: str, expected: tuple[str, str, str]) -> None:
    world = running_world() if step != "new" else World()
    if step == "running":
        world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
    elif step == "succeeded":
        world.put(job("bot-train-1", succeeded=1, condition="Complete"),
                  pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    elif step == "failed":
        world.put(job("bot-train-1", failed=3, condition="Failed", reason="BackoffLimitExceeded"))
    elif step == "suspended":
        world.put(job("bot-train-1", active=1))
        world.edit(suspend=True)
    elif step == "bad-spec":
        world = World(spec=merge(SPEC, {"quantization": {"quantType": "nf4"}}))
    plan = world.step(LATER)
    assert verdict(plan) == expected, plan.status["conditions"]
    assert world.reconcile(LATER).patch == {}, "not a fixed point"


def test_invalid_edit_while_training_is_stalled_but_the_run_goes_on() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
    world.edit(method="lora", quantization={"quantType": "nf4"})
    plan = world.step()
    assert plan.phase == "Running"
    assert verdict(plan) == ("False", "False", "True")
    assert cond(plan, "Stalled")["reason"] == "InvalidSpec"


UNSCHEDULABLE = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                  "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]


def test_unschedulable_pod_shows_the_schedulers_message() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", conditions=UNSCHEDULABLE))
    plan = world.step()
    assert plan.phase == "Running" and "Insufficient nvidia.com/gpu" in plan.message
    assert cond(plan, "Ready")["reason"] == "Unschedulable"
    assert verdict(plan) == ("False", "True", "False"), "a cluster autoscaler may still make room"


def test_image_pull_failure_is_stalled() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", waiting="ImagePullBackOff"))
    plan = world.step()
    assert verdict(plan) == ("False", "False", "True")
    assert cond(plan, "Stalled")["reason"] == "PodBlocked" and "spec.image" in plan.message


def test_pod_blocker_reads_only_pending_pods() -> None:
    assert pod_blocker({"phase": "Running", "conditions": UNSCHEDULABLE}) is None
    blocker = pod_blocker({"phase": "Pending", "conditions": UNSCHEDULABLE})
    assert blocker is not None and blocker.reason == "Unschedulable" and not blocker.stalled


def test_queued_in_kueue() -> None:
    world = World(spec=merge(SPEC, {"queueName": "gpus"}))
    world.jobs = [vjob(succeeded=1, condition="Complete")]
    world.pods = [vpod("Succeeded", exit_code=0, message=result(validation=True))]
    created = world.step()
    manifest = next(a.manifest for a in created.actions if getattr(a, "kind", "") == "Job")
    assert manifest["spec"]["suspend"] is True
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    queued = world.step()
    assert queued.phase == "Queued" and "gpus" in queued.message and queued.actions == ()
    assert verdict(queued) == ("False", "True", "False")
    for j in world.jobs:
        j["spec"]["suspend"] = False  # Kueue admitted it
    assert world.step().phase == "Running"
    world.edit(suspend=True)
    assert names(world.step()) == ["delete Job/bot-train-1"], "a queued Job's suspend is Kueue's: delete instead"


def test_training_job_failure_policy() -> None:
    spec = LoRAJobSpec.model_validate(SPEC)
    body = World().body
    manifest = training_job(ObjectRef.of(body), spec, 1, 1, SETTINGS)["spec"]
    assert manifest["podReplacementPolicy"] == "Failed"
    assert manifest["podFailurePolicy"] == pod_failure_policy()
    rules = {r["action"]: r for r in manifest["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"]["values"] == [2]
    ignore = [r for r in manifest["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"type": "DisruptionTarget", "status": "True"} in ignore[-1]["onPodConditions"]
    assert ignore[0]["onExitCodes"]["values"] == [143]
    assert manifest["suspend"] is False


def test_trainer_and_operator_agree_on_exit_codes() -> None:
    from kubelora_trainer.errors import InvalidDatasetError, TrainingStoppedError

    assert InvalidDatasetError.exit_code == 2
    assert TrainingStoppedError.exit_code == 143


def test_result_survives_a_collected_pod() -> None:
    """The trainer records the adapter in status.progress; the pod and its termination message may be gone."""
    world = running_world(progress={"step": 20, "totalSteps": 20, "adapter": ADAPTER})
    world.put(job("bot-train-1", succeeded=1, condition="Complete"))
    plan = world.step()
    assert plan.phase == "Succeeded"
    assert plan.status["adapter"]["digest"] == ADAPTER["digest"]


def test_last_succeeded_adapter_is_kept_across_retrains() -> None:
    world = running_world()
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    assert world.step().status["lastSucceededAdapter"]["digest"] == ADAPTER["digest"]
    world.run_config = config(1)
    world.edit(training={"learningRate": 0.001})
    retrain = world.step(LATER)
    assert retrain.status["revision"] == 2 and "adapter" not in retrain.status
    assert retrain.status["lastSucceededAdapter"]["uri"] == ADAPTER["uri"], "serving can stay on it"
    world.put(vjob(2, failed=1, condition="Failed", reason="BackoffLimitExceeded"),
              vpod("Failed", 2, exit_code=2, message=result(False, "InvalidDataset", "bad")))
    failed = world.step(LATER)
    assert failed.phase == "Failed" and failed.status["lastSucceededAdapter"]["uri"] == ADAPTER["uri"]
