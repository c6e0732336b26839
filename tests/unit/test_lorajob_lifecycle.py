"""LoRAJob reconcile: spec changes (revisions, SpecImmutable), suspend/resume, idempotency, event filter."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.reconcile.lorajob import needs_reconcile, training_changes, with_training_fields

from .test_lorajob_world import (
    ADAPTER,
    LATER,
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

# --- spec changes ------------------------------------------------------------------------------


def test_training_field_change_while_running_is_reported_not_applied() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1))
    world.run_config = config()
    world.edit(training={"learningRate": 0.001}, lora={"r": 8})
    plan = world.step()
    assert plan.phase == "Running" and plan.actions == () and plan.status["revision"] == 1
    validated = cond(plan, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "SpecImmutable")
    assert validated["message"].startswith(
        "spec.lora.r, spec.training.learningRate changed after training of revision 1 started"
    )
    assert "new run when this one ends" in validated["message"]
    assert world.reconcile().patch == {}
    world.edit(training={"learningRate": 0.005}, lora={"r": 16})  # reverted
    assert cond(world.step(), "Validated")["reason"] == "ValidationPassed"


def test_pending_change_starts_a_new_revision_when_the_run_ends() -> None:
    world = running_world()
    world.run_config = config()
    world.edit(training={"learningRate": 0.001})
    world.put(
        job("bot-train-1", succeeded=1, condition="Complete"),
        pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
    )
    done = world.step(LATER)
    assert done.phase == "Succeeded" and done.requeue and done.status["adapter"] == ADAPTER
    world.status = dict(world.status or {}, progress={"step": 20, "percent": 100})
    nxt = world.step(LATER)
    assert nxt.phase == "Validating" and nxt.status["revision"] == 2 and not nxt.requeue
    assert names(nxt) == ["create ConfigMap/bot-trainer-2", "create Job/bot-validate-2"]
    assert nxt.patch["progress"] is None and nxt.patch["adapter"] is None and nxt.patch["jobName"] is None


def test_non_training_change_after_success_changes_nothing_but_generation() -> None:
    world = running_world()
    world.put(
        job("bot-train-1", succeeded=1, condition="Complete"),
        pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
    )
    world.step(LATER)
    world.run_config = config()
    world.edit(backoffLimit=5, resources={"gpus": 1})
    plan = world.step(LATER)
    assert (
        plan.phase == "Succeeded" and plan.actions == () and plan.patch.keys() == {"observedGeneration", "conditions"}
    )


def test_change_during_preflight_restarts_preflight() -> None:
    world = World()
    world.step()
    world.run_config = config()
    world.edit(dataset={"uri": "pvc://data/fixed.jsonl"})
    plan = world.step()
    assert plan.status["revision"] == 2 and plan.phase == "Validating"
    assert names(plan) == ["delete Job/bot-validate-1", "create ConfigMap/bot-trainer-2", "create Job/bot-validate-2"]


def test_change_after_preflight_failure_starts_a_new_revision() -> None:
    world = World(
        jobs=[vjob(failed=1, condition="Failed", reason="BackoffLimitExceeded")],
        pods=[vpod("Failed", exit_code=2, message=result(False, "InvalidDataset", "line 3"))],
    )
    world.step()
    assert world.status is not None and world.status["phase"] == "Failed"
    world.run_config = config()
    world.edit(dataset={"uri": "pvc://data/fixed.jsonl"})
    plan = world.step(LATER)
    assert plan.phase == "Validating" and plan.status["revision"] == 2
    assert plan.patch["completionTime"] is None


def test_training_changes_and_merge() -> None:
    old = LoRAJobSpec.model_validate(SPEC)
    new = LoRAJobSpec.model_validate(merge(SPEC, {"training": {"epochs": 1}, "resources": {"gpus": 4}}))
    assert training_changes(new, old) == ["spec.training.epochs"]
    merged = with_training_fields(new, old)
    assert merged.training == old.training and merged.resources.gpus == 4


# --- suspend / resume --------------------------------------------------------------------------


def test_suspend_suspends_the_job_and_resume_continues_from_checkpoint() -> None:
    world = running_world(progress={"step": 10, "lastCheckpoint": "checkpoint-10"})
    world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
    world.edit(suspend=True)
    suspended = world.step()
    assert suspended.phase == "Suspended" and names(suspended) == ["suspend Job/bot-train-1"]
    assert cond(suspended, "Running")["reason"] == "Suspended"
    assert (cond(suspended, "Reconciling")["status"], cond(suspended, "Stalled")["status"]) == ("False", "False")
    assert "checkpoint-10" in suspended.message
    assert world.reconcile().actions == (), "the Job is suspended: not suspended twice"

    world.pods = []  # the Job controller stopped the pod (it saved a checkpoint on SIGTERM)
    world.edit(suspend=False)
    resumed = world.step(LATER)
    assert names(resumed) == ["resume Job/bot-train-1"], "the same Job resumes: no second trainer, same attempts"
    assert resumed.phase == "Running" and resumed.status["jobName"] == "bot-train-1"
    assert resumed.status["revision"] == 1
    assert world.reconcile(LATER).actions == ()


def test_suspend_before_training_keeps_preflight_but_creates_no_training_job() -> None:
    world = World(spec=merge(SPEC, {"suspend": True}))
    first = world.step()
    assert first.phase == "Suspended" and names(first)[-1] == "create Job/bot-validate-1"
    world.jobs = [vjob(succeeded=1, condition="Complete")]
    world.pods = [vpod("Succeeded", exit_code=0)]
    plan = world.step()
    assert plan.phase == "Suspended" and plan.actions == ()
    assert cond(plan, "Validated")["status"] == "True"
    world.edit(suspend=False)
    assert names(world.step())[-1] == "create Job/bot-train-2"


def test_job_finishing_while_suspending_still_counts() -> None:
    world = running_world()
    world.put(
        job("bot-train-1", succeeded=1, condition="Complete"),
        pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
    )
    world.edit(suspend=True)
    assert world.step().phase == "Succeeded"


# --- idempotency and robustness ----------------------------------------------------------------


@pytest.mark.parametrize(
    "world",
    [
        pytest.param(World(), id="new"),
        pytest.param(World(jobs=[vjob(active=1)], pods=[vpod("Running")]), id="validating"),
        pytest.param(World(spec=merge(SPEC, {"lora": {"r": 0}})), id="invalid"),
    ],
)
def test_same_inputs_same_plan(world: World) -> None:
    first, second = world.reconcile(), world.reconcile()
    assert first == second


def test_fixed_point_after_every_step_of_a_full_run() -> None:
    world = World()
    for stage in range(4):
        world.step()
        again = world.reconcile()
        assert (again.patch, again.actions) == ({}, ()), f"stage {stage}"
        if stage == 0:
            world.jobs = [vjob(succeeded=1, condition="Complete")]
            world.pods = [vpod("Succeeded", exit_code=0)]
        elif stage == 1:
            world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
        elif stage == 2:
            world.put(
                job("bot-train-1", succeeded=1, condition="Complete"),
                pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)),
            )
    assert world.status is not None and world.status["phase"] == "Succeeded"
    assert world.reconcile().actions == ()


def test_garbage_in_status_is_dropped_not_fatal() -> None:
    world = World(status={"phase": "Nonsense", "attempts": "many", "conditions": "x", "foreign": 1})
    plan = world.reconcile()
    assert plan.phase == "Validating" and plan.status["attempts"] == 0
    assert "foreign" not in plan.patch  # not ours: left alone


@pytest.mark.parametrize(
    ("event", "meta", "status", "expected"),
    [
        pytest.param(None, {}, {"phase": "Running", "observedGeneration": 1}, True, id="operator-start-resumes"),
        pytest.param("ADDED", {}, None, True, id="created"),
        pytest.param("MODIFIED", {}, {"phase": "Running", "observedGeneration": 1}, False, id="status-patch"),
        pytest.param(
            "MODIFIED", {"generation": 2}, {"phase": "Running", "observedGeneration": 1}, True, id="spec-changed"
        ),
        pytest.param("MODIFIED", {}, {"progress": {"step": 3}}, True, id="status-wiped"),
        pytest.param("MODIFIED", {"deletionTimestamp": "t"}, {"phase": "Running"}, False, id="being-deleted"),
        pytest.param("DELETED", {}, {"phase": "Running", "observedGeneration": 1}, False, id="deleted"),
    ],
)
def test_needs_reconcile(
    event: str | None, meta: dict[str, Any], status: dict[str, Any] | None, expected: bool
) -> None:
    body: dict[str, Any] = {"metadata": {"name": "bot", "generation": 1, **meta}}
    if status is not None:
        body["status"] = status
    assert needs_reconcile(event, body) is expected
