"""Every phase transition of the pure LoRAJob reconcile, fed with plain dicts as the API returns them:
pre-flight, training, retries, deadline, vanished Jobs, bad input and invalid specs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.runtime import TrainerRunConfig

from .test_lorajob_world import (
    ADAPTER,
    DIGEST,
    LATER,
    NOW,
    SPEC,
    World,
    cond,
    job,
    merge,
    names,
    pod,
    result,
    running_world,
    vjob,
    vpod,
)

# --- the happy path, step by step ------------------------------------------------------------


def test_new_job_starts_preflight() -> None:
    plan = World().reconcile()
    assert plan.phase == "Validating" and plan.transitioned and plan.old_phase is None
    assert names(plan) == ["create ConfigMap/bot-trainer-1", "create Job/bot-validate-1"]
    assert plan.status["revision"] == 1 and plan.status["observedGeneration"] == 1
    assert plan.status["validationJobName"] == "bot-validate-1"
    assert cond(plan, "Validated")["status"] == "Unknown"
    assert cond(plan, "Ready") == {
        "type": "Ready",
        "status": "False",
        "reason": "Validating",
        "message": plan.message,
        "lastTransitionTime": NOW,
        "observedGeneration": 1,
    }
    assert "jobName" not in plan.status


def test_preflight_pass_creates_identity_and_training_job() -> None:
    world = World()
    world.step()
    world.pods.append(vpod("Succeeded", exit_code=0, message=result(validation=True)))
    world.jobs[0] = vjob(succeeded=1, condition="Complete")
    plan = world.step(LATER)
    assert plan.phase == "Running" and plan.transitioned
    assert names(plan) == [
        "create ServiceAccount/bot-trainer",
        "create Role/bot-trainer",
        "create RoleBinding/bot-trainer",
        "create Job/bot-train-1",
    ]
    assert cond(plan, "Validated")["status"] == "True"
    assert cond(plan, "Validated")["message"] == "pre-flight passed: 90 train rows, 10 eval rows (messages)"
    assert cond(plan, "Running")["reason"] == "JobCreated"
    assert plan.status["jobName"] == "bot-train-1" and plan.status["startTime"] == LATER
    again = world.reconcile(LATER)
    assert (again.patch, again.actions) == ({}, ())


def test_several_nodes_get_a_rendezvous_service_before_their_indexed_job() -> None:
    world = World(spec=merge(SPEC, {"resources": {"gpus": 0, "nodes": 2}}))
    world.step()
    world.pods.append(vpod("Succeeded", exit_code=0, message=result(validation=True)))
    world.jobs[0] = vjob(succeeded=1, condition="Complete")
    plan = world.step(LATER)
    assert names(plan)[-2:] == ["create Service/bot-train-1", "create Job/bot-train-1"]
    created = {a.manifest["kind"]: a.manifest for a in plan.actions}
    assert created["Job"]["spec"]["completionMode"] == "Indexed"
    assert created["Job"]["spec"]["template"]["spec"]["subdomain"] == created["Service"]["metadata"]["name"]
    # Two pods of one attempt are one attempt, not two.
    world.put(pod("p0", "bot-train-1", "Running"), pod("p1", "bot-train-1", "Running"))
    world.jobs[-1]["status"]["active"] = 2
    running = world.step(LATER)
    assert running.phase == "Running" and world.status is not None and world.status["attempts"] == 1
    assert "attempt 1 of 3" in running.message


def test_validation_message_survives_later_reconciles() -> None:
    world = running_world()
    world.put(pod("bot-train-1-aaaaa", "bot-train-1", "Running"), job("bot-train-1", active=1))
    plan = world.step()
    assert cond(plan, "Validated")["message"].startswith("pre-flight passed: 90 train rows")
    assert cond(plan, "Running")["reason"] == "Training" and plan.message == "training (attempt 1 of 3)"


@pytest.mark.parametrize(
    ("jobs", "pods", "phase", "reason", "message"),
    [
        pytest.param(
            [job("bot-train-1", active=1)],
            [pod("p1", "bot-train-1")],
            "Running",
            "JobCreated",
            "training Job bot-train-1 created; waiting for its pod to start",
            id="pod-pending",
        ),
        pytest.param(
            [job("bot-train-1", active=1)],
            [pod("p1", "bot-train-1", "Running")],
            "Running",
            "Training",
            "training (attempt 1 of 3)",
            id="pod-running",
        ),
        pytest.param(
            [job("bot-train-1", active=1, failed=1)],
            [
                pod("p1", "bot-train-1", "Failed", exit_code=1, message="OOM"),
                pod("p2", "bot-train-1", "Running", created=LATER),
            ],
            "Running",
            "Training",
            "training (attempt 2 of 3)",
            id="retry-running",
        ),
        pytest.param(
            [job("bot-train-1", active=1, failed=1)],
            [pod("p1", "bot-train-1", "Failed", exit_code=1), pod("p2", "bot-train-1", created=LATER)],
            "Running",
            "JobCreated",
            "retrying (attempt 2 of 3); the new pod resumes from the newest checkpoint",
            id="retry-pending",
        ),
        pytest.param(
            [job("bot-train-1", succeeded=1, condition="Complete")],
            [pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True))],
            "Succeeded",
            "Completed",
            f"adapter published at pvc://adapters/bot/rev-1 ({DIGEST})",
            id="succeeded",
        ),
        pytest.param(
            [job("bot-train-1", succeeded=1, condition="Complete")],
            [pod("p1", "bot-train-1", "Succeeded", exit_code=0, message="")],
            "Failed",
            "TrainingFailed",
            "training Job bot-train-1 completed without a published adapter: container exited with code 0 (Completed)",
            id="complete-without-result",
        ),
        pytest.param(
            [job("bot-train-1", failed=3, condition="Failed", reason="BackoffLimitExceeded")],
            [
                pod(
                    f"p{i}",
                    "bot-train-1",
                    "Failed",
                    exit_code=1,
                    created=f"2026-01-01T00:0{i}:00Z",
                    message=result(False, "TrainingFailed", f"CUDA error {i}"),
                )
                for i in range(3)
            ],
            "Failed",
            "BackoffLimitExceeded",
            "all 3 attempts failed; last error: CUDA error 2",
            id="backoff-limit",
        ),
        pytest.param(
            [job("bot-train-1", failed=1, condition="Failed", reason="DeadlineExceeded")],
            [],
            "Failed",
            "DeadlineExceeded",
            "activeDeadlineSeconds (86400) elapsed; last error: DeadlineExceeded",
            id="deadline",
        ),
        pytest.param(
            [job("bot-train-1", failed=1, condition="Failed", reason="PodFailurePolicy")],
            [
                pod(
                    "p1",
                    "bot-train-1",
                    "Failed",
                    exit_code=2,
                    message=result(False, "InvalidDataset", "train.jsonl line 7: no 'messages' key"),
                )
            ],
            "Failed",
            "TrainingFailed",
            "InvalidDataset: train.jsonl line 7: no 'messages' key",
            id="bad-input-fails-fast",
        ),
        pytest.param(
            [], [], "Failed", "JobRemoved", "training Job bot-train-1 disappeared before it finished", id="job-vanished"
        ),
        pytest.param(
            [job("bot-train-1", active=1, deleting=True)],
            [],
            "Failed",
            "JobRemoved",
            "training Job bot-train-1 disappeared before it finished",
            id="job-deleted-by-someone",
        ),
    ],
)
def test_training(
    jobs: list[dict[str, Any]], pods: list[dict[str, Any]], phase: str, reason: str, message: str
) -> None:
    world = running_world()
    world.jobs = [vjob(succeeded=1, condition="Complete"), *jobs]
    world.pods = [*world.pods, *pods]
    plan = world.step(LATER)
    assert (plan.phase, plan.message) == (phase, message)
    assert cond(plan, "Running")["reason"] == reason
    assert cond(plan, "Ready")["status"] == ("True" if phase == "Succeeded" else "False")
    assert cond(plan, "Succeeded")["status"] == {"Succeeded": "True", "Failed": "False"}.get(phase, "Unknown")
    if phase in ("Succeeded", "Failed"):
        assert plan.status["completionTime"] == LATER
        assert cond(plan, "Validated")["status"] == "True"
    assert names(plan) == [], "the Job controller's podFailurePolicy stops retries on exit 2, not a delete"
    assert cond(plan, "Stalled")["status"] == ("True" if phase == "Failed" else "False")
    assert cond(plan, "Reconciling")["status"] == ("True" if phase == "Running" else "False")
    again = world.reconcile(LATER)
    assert (again.patch, again.actions) == ({}, ()), "not a fixed point"


def test_success_publishes_adapter_and_finalises_progress() -> None:
    world = running_world(progress={"step": 19, "totalSteps": 20, "percent": 95, "lastCheckpoint": "checkpoint-15"})
    world.put(
        job("bot-train-1", succeeded=1, condition="Complete"),
        pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
    )
    plan = world.step(LATER)
    assert plan.status["adapter"] == ADAPTER
    assert plan.patch["progress"] == {"percent": 100}
    assert world.status is not None and world.status["progress"]["step"] == 19  # the trainer's fields stay
    assert plan.status["attempts"] == 1


def test_terminal_is_final_even_if_the_job_vanishes() -> None:
    world = running_world()
    world.put(
        job("bot-train-1", succeeded=1, condition="Complete"),
        pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
    )
    world.step(LATER)
    world.jobs, world.pods = [], []
    plan = world.reconcile("2026-01-02T00:00:00Z")
    assert plan.phase == "Succeeded" and (plan.patch, plan.actions) == ({}, ())


def test_lost_status_patch_adopts_the_existing_job() -> None:
    """Operator killed between creating the Job and patching the status: no duplicate Job."""
    world = running_world()
    assert world.status is not None
    world.status.pop("jobName")
    world.status["phase"] = "Validating"
    world.generation = 4  # the spec moved on (a non-training field): a new name would be bot-train-4
    world.spec["backoffLimit"] = 5
    world.put(job("bot-train-1", active=1))
    plan = world.step()
    assert plan.actions == () and plan.status["jobName"] == "bot-train-1" and plan.phase == "Running"


# --- pre-flight failures and invalid specs ---------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "vjob_kw", "reason", "message"),
    [
        pytest.param(
            [vpod("Failed", exit_code=2, message=result(False, "InvalidDataset", "train.jsonl line 3: invalid JSON"))],
            {"failed": 1, "condition": "Failed", "reason": "BackoffLimitExceeded"},
            "InvalidDataset",
            "pre-flight failed: train.jsonl line 3: invalid JSON",
            id="bad-dataset",
        ),
        pytest.param(
            [vpod("Failed", exit_code=2, message=result(False, "BaseModelUnavailable", "no config.json"))],
            {"active": 1},
            "BaseModelUnavailable",
            "pre-flight failed: no config.json",
            id="pod-failed-before-job-condition",
        ),
        pytest.param(
            [vpod("Failed", exit_code=1, message="Traceback...\nMemoryError")],
            {"failed": 1, "condition": "Failed", "reason": "BackoffLimitExceeded"},
            "PreflightFailed",
            "pre-flight failed: Traceback... MemoryError",
            id="crash-logs",
        ),
        pytest.param(
            [],
            {"failed": 1, "condition": "Failed", "reason": "DeadlineExceeded"},
            "PreflightFailed",
            "pre-flight failed: DeadlineExceeded",
            id="no-pod",
        ),
        pytest.param(
            [vpod("Succeeded", exit_code=0, message=result(False, "InvalidSpec", "lora.r too big"))],
            {"succeeded": 1, "condition": "Complete"},
            "InvalidSpec",
            "pre-flight failed: lora.r too big",
            id="exit-0-but-not-ok",
        ),
    ],
)
def test_preflight_failure_ends_failed_without_training(
    pods: list[dict[str, Any]], vjob_kw: dict[str, Any], reason: str, message: str
) -> None:
    world = World()
    world.step()
    world.jobs, world.pods = [vjob(**vjob_kw)], pods
    plan = world.step(LATER)
    assert (plan.phase, plan.message, plan.actions) == ("Failed", message, ())
    for ctype in ("Validated", "Running", "Succeeded", "Ready"):
        assert (cond(plan, ctype)["status"], cond(plan, ctype)["reason"]) == ("False", reason), ctype
    assert plan.status["completionTime"] == LATER
    assert "jobName" not in plan.status
    assert world.reconcile(LATER).patch == {}


def test_noop_preflight_without_result_passes() -> None:
    """Exit 0 with no TrainerResult (the scale benchmark's noop image) counts as passed."""
    world = World(jobs=[vjob(succeeded=1, condition="Complete")], pods=[vpod("Succeeded", exit_code=0)])
    world.step()
    plan = world.step()
    assert plan.phase == "Running" and cond(plan, "Validated")["message"] == "pre-flight passed"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        pytest.param(
            {"quantization": {"quantType": "nf4"}},
            "spec: quantization is only used with method: qlora",
            id="quantization-with-lora",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://data/x.jsonl", "evalSplit": 0.1, "evalUri": "pvc://data/e.jsonl"}},
            "spec.dataset: dataset: set either evalSplit or evalUri",
            id="split-and-uri",
        ),
        pytest.param({"lora": {"r": 0}}, "spec.lora.r: Input should be greater than or equal to 1", id="schema-rule"),
    ],
)
def test_invalid_spec_fails_without_retry(spec: dict[str, Any], fragment: str) -> None:
    world = World(spec=merge(SPEC, spec))
    plan = world.step()
    assert plan.phase == "Failed" and plan.actions == ()
    assert fragment in plan.message and plan.message.startswith("invalid spec: ")
    assert cond(plan, "Validated")["reason"] == "InvalidSpec" and cond(plan, "Ready")["reason"] == "InvalidSpec"
    assert "revision" not in plan.status
    assert world.reconcile().patch == {}
    world.edit(quantization=None)
    if "lora" in spec:
        world.edit(lora={"r": 8})
    if "dataset" in spec:
        world.edit(dataset={"evalUri": None})
    fixed = world.step()
    assert fixed.phase == "Validating" and fixed.status["revision"] == world.generation


def test_invalid_spec_while_running_keeps_the_run() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1))
    world.run_config = TrainerRunConfig(name="bot", namespace="ml", revision=1, spec=LoRAJobSpec.model_validate(SPEC))
    world.edit(quantization={"quantType": "nf4"})
    plan = world.step()
    assert plan.phase == "Running" and plan.actions == ()
    assert cond(plan, "Validated")["reason"] == "InvalidSpec"
    assert "revision 1 keeps running" in cond(plan, "Validated")["message"]
    assert cond(plan, "Running")["status"] == "True" and plan.status["observedGeneration"] == 2


@pytest.mark.parametrize("uri", ["s3://elsewhere/adapter", "pvc://adapters/bot/../other/rev-1", "pvc://adapters/bot"])
@pytest.mark.parametrize("via", ["termination-message", "progress"])
def test_adapter_outside_output_is_never_published(uri: str, via: str) -> None:
    """What the trainer reports is a claim: an adapter outside spec.output.uri fails the run, unserved."""
    forged = {**ADAPTER, "uri": uri}
    progress: dict[str, Any] = {"step": 20, "totalSteps": 20}
    message = result()
    if via == "progress":
        progress["adapter"] = forged
    else:
        message = json.dumps({"ok": True, "reason": "", "message": "", "adapter": forged})
    world = running_world(progress=progress)
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=message))
    plan = world.step(LATER)
    assert plan.phase == "Failed"
    assert cond(plan, "Succeeded")["reason"] == "AdapterOutsideOutput"
    assert "outside spec.output.uri pvc://adapters/bot" in plan.status["message"]
    assert "adapter" not in plan.status and "lastSucceededAdapter" not in plan.status
