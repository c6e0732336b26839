"""Every phase transition of the pure LoRAJob reconcile, fed with plain dicts as the API returns them.

``World`` stands in for the cluster: it applies a plan (merge-patches the status, makes created Jobs
appear, marks deleted ones as terminating) so tests can also check that a reconcile reaches a fixed
point: the next reconcile with the same facts writes nothing and does nothing.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.runtime import TrainerRunConfig
from kubelora.reconcile.lorajob import Plan, needs_reconcile, reconcile, training_changes, with_training_fields
from kubelora.reconcile.lorajob_actions import Create, Delete
from kubelora.reconcile.lorajob_observed import observe
from kubelora.settings import Settings

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"
DIGEST = "sha256:" + "ab" * 32
SPEC: dict[str, Any] = {
    "baseModel": {"uri": "pvc://models/tiny"}, "dataset": {"uri": "pvc://data/train.jsonl"},
    "output": {"uri": "pvc://adapters/bot"}, "method": "lora", "resources": {"gpus": 0},
    "training": {"maxSteps": 20, "saveSteps": 5, "learningRate": 0.005}, "backoffLimit": 2,
}
SETTINGS = Settings(trainer_image="ghcr.io/kubelora/trainer:test")
ADAPTER = {"uri": "pvc://adapters/bot/rev-1", "digest": DIGEST, "sizeBytes": 1234, "rank": 16,
           "baseModel": "pvc://models/tiny", "peftType": "LORA"}


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch, as the API server applies it."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def result(ok: bool = True, reason: str = "", message: str = "", adapter: bool = False,
           validation: bool = False) -> str:
    data: dict[str, Any] = {"ok": ok, "reason": reason, "message": message}
    if adapter:
        data["adapter"] = ADAPTER
    if validation:
        data["validation"] = {"trainRows": 90, "evalRows": 10, "format": "messages"}
    return json.dumps(data)


def job(name: str, revision: int = 1, *, component: str = "trainer", active: int = 0, succeeded: int = 0,
        failed: int = 0, condition: str | None = None, reason: str = "", deleting: bool = False,
        created: str = NOW) -> dict[str, Any]:
    status: dict[str, Any] = {"active": active, "succeeded": succeeded, "failed": failed}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": reason}]
        status["completionTime"] = LATER if condition == "Complete" else None
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "creationTimestamp": created, "labels": {
        "kubelora.io/lorajob": "bot", "app.kubernetes.io/component": component, "kubelora.io/revision": str(revision)}}
    if deleting:
        meta["deletionTimestamp"] = LATER
    return {"metadata": meta, "status": status}


def pod(name: str, job_name: str, phase: str = "Pending", *, exit_code: int | None = None, message: str = "",
        component: str = "trainer", revision: int = 1, created: str = NOW) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message}}}]
    return {"metadata": {"name": name, "creationTimestamp": created, "labels": {
        "job-name": job_name, "kubelora.io/lorajob": "bot", "app.kubernetes.io/component": component,
        "kubelora.io/revision": str(revision)}}, "status": status}


def vjob(revision: int = 1, **kw: Any) -> dict[str, Any]:
    return job(f"bot-validate-{revision}", revision, component="preflight", **kw)


def vpod(phase: str, revision: int = 1, **kw: Any) -> dict[str, Any]:
    return pod(f"bot-validate-{revision}-abcde", f"bot-validate-{revision}", phase, component="preflight",
               revision=revision, **kw)


@dataclass
class World:
    spec: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SPEC))
    generation: int = 1
    status: dict[str, Any] | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    run_config: TrainerRunConfig | None = None

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "spec": self.spec,
                                "metadata": {"name": "bot", "namespace": "ml", "uid": "uid-bot",
                                             "generation": self.generation}}
        if self.status is not None:
            body["status"] = self.status
        return body

    def edit(self, **spec: Any) -> World:
        """A spec change as the API server records it: new generation."""
        self.spec = merge(self.spec, spec)
        self.generation += 1
        return self

    def reconcile(self, now: str = NOW) -> Plan:
        return reconcile(self.body, observe(self.jobs, self.pods), self.run_config, SETTINGS, now)

    def apply(self, plan: Plan) -> World:
        self.status = merge(self.status or {}, plan.patch)
        for action in plan.actions:
            if isinstance(action, Create) and action.kind == "Job":
                labels = action.manifest["metadata"]["labels"]
                self.jobs.append(job(action.name, int(labels["kubelora.io/revision"]),
                                     component=labels["app.kubernetes.io/component"]))
            elif isinstance(action, Delete):
                for j in self.jobs:
                    if j["metadata"]["name"] == action.name:
                        j["metadata"]["deletionTimestamp"] = NOW
        return self

    def put(self, *objs: dict[str, Any]) -> World:
        """Add Jobs and Pods (pods have a job-name label), replacing those of the same name."""
        for obj in objs:
            bucket = self.pods if "job-name" in obj["metadata"]["labels"] else self.jobs
            bucket[:] = [o for o in bucket if o["metadata"]["name"] != obj["metadata"]["name"]] + [obj]
        return self

    def step(self, now: str = NOW) -> Plan:
        plan = self.reconcile(now)
        self.apply(plan)
        return plan


def cond(plan_or_status: Plan | dict[str, Any], ctype: str) -> dict[str, Any]:
    status = plan_or_status.status if isinstance(plan_or_status, Plan) else plan_or_status
    return next(c for c in status["conditions"] if c["type"] == ctype)


def names(plan: Plan) -> list[str]:
    return [str(a) for a in plan.actions]


def running_world(**status: Any) -> World:
    """Validated, training Job bot-train-1 created, as the operator would have left it."""
    world = World(jobs=[vjob(succeeded=1, condition="Complete")],
                  pods=[vpod("Succeeded", exit_code=0, message=result(validation=True))])
    world.step()
    world.step()
    assert world.status is not None and world.status["phase"] == "Running"
    world.status.update(status)
    return world


# --- the happy path, step by step ------------------------------------------------------------


def test_new_job_starts_preflight() -> None:
    plan = World().reconcile()
    assert plan.phase == "Validating" and plan.transitioned and plan.old_phase is None
    assert names(plan) == ["create ConfigMap/bot-trainer-1", "create Job/bot-validate-1"]
    assert plan.status["revision"] == 1 and plan.status["observedGeneration"] == 1
    assert plan.status["validationJobName"] == "bot-validate-1"
    assert cond(plan, "Validated")["status"] == "Unknown"
    assert cond(plan, "Ready") == {"type": "Ready", "status": "False", "reason": "Validating",
                                   "message": plan.message, "lastTransitionTime": NOW, "observedGeneration": 1}
    assert "jobName" not in plan.status


def test_preflight_pass_creates_identity_and_training_job() -> None:
    world = World()
    world.step()
    world.pods.append(vpod("Succeeded", exit_code=0, message=result(validation=True)))
    world.jobs[0] = vjob(succeeded=1, condition="Complete")
    plan = world.step(LATER)
    assert plan.phase == "Running" and plan.transitioned
    assert names(plan) == ["create ServiceAccount/bot-trainer", "create Role/bot-trainer",
                           "create RoleBinding/bot-trainer", "create Job/bot-train-1"]
    assert cond(plan, "Validated")["status"] == "True"
    assert cond(plan, "Validated")["message"] == "pre-flight passed: 90 train rows, 10 eval rows (messages)"
    assert cond(plan, "Running")["reason"] == "JobCreated"
    assert plan.status["jobName"] == "bot-train-1" and plan.status["startTime"] == LATER
    again = world.reconcile(LATER)
    assert (again.patch, again.actions) == ({}, ())


def test_validation_message_survives_later_reconciles() -> None:
    world = running_world()
    world.put(pod("bot-train-1-aaaaa", "bot-train-1", "Running"), job("bot-train-1", active=1))
    plan = world.step()
    assert cond(plan, "Validated")["message"].startswith("pre-flight passed: 90 train rows")
    assert cond(plan, "Running")["reason"] == "Training" and plan.message == "training (attempt 1 of 3)"


@pytest.mark.parametrize(("jobs", "pods", "phase", "reason", "message"), [
    pytest.param([job("bot-train-1", active=1)], [pod("p1", "bot-train-1")], "Running", "JobCreated",
                 "training Job bot-train-1 created; waiting for its pod to start", id="pod-pending"),
    pytest.param([job("bot-train-1", active=1)], [pod("p1", "bot-train-1", "Running")], "Running", "Training",
                 "training (attempt 1 of 3)", id="pod-running"),
    pytest.param([job("bot-train-1", active=1, failed=1)],
                 [pod("p1", "bot-train-1", "Failed", exit_code=1, message="OOM"),
                  pod("p2", "bot-train-1", "Running", created=LATER)], "Running", "Training",
                 "training (attempt 2 of 3)", id="retry-running"),
    pytest.param([job("bot-train-1", active=1, failed=1)],
                 [pod("p1", "bot-train-1", "Failed", exit_code=1), pod("p2", "bot-train-1", created=LATER)],
                 "Running", "JobCreated",
                 "retrying (attempt 2 of 3); the new pod resumes from the newest checkpoint", id="retry-pending"),
    pytest.param([job("bot-train-1", succeeded=1, condition="Complete")],
                 [pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True))],
                 "Succeeded", "Completed", f"adapter published at pvc://adapters/bot/rev-1 ({DIGEST})",
                 id="succeeded"),
    pytest.param([job("bot-train-1", succeeded=1, condition="Complete")],
                 [pod("p1", "bot-train-1", "Succeeded", exit_code=0, message="")], "Failed", "TrainingFailed",
                 "training Job bot-train-1 completed without a published adapter: container exited with code 0 "
                 "(Completed)", id="complete-without-result"),
    pytest.param([job("bot-train-1", failed=3, condition="Failed", reason="BackoffLimitExceeded")],
                 [pod(f"p{i}", "bot-train-1", "Failed", exit_code=1, created=f"2026-01-01T00:0{i}:00Z",
                      message=result(False, "TrainingFailed", f"CUDA error {i}")) for i in range(3)],
                 "Failed", "BackoffLimitExceeded", "all 3 attempts failed; last error: CUDA error 2",
                 id="backoff-limit"),
    pytest.param([job("bot-train-1", failed=1, condition="Failed", reason="DeadlineExceeded")], [],
                 "Failed", "DeadlineExceeded",
                 "activeDeadlineSeconds (86400) elapsed; last error: DeadlineExceeded", id="deadline"),
    pytest.param([job("bot-train-1", active=1, failed=1)],
                 [pod("p1", "bot-train-1", "Failed", exit_code=2,
                      message=result(False, "InvalidDataset", "train.jsonl line 7: no 'messages' key"))],
                 "Failed", "TrainingFailed", "InvalidDataset: train.jsonl line 7: no 'messages' key",
                 id="bad-input-fails-fast"),
    pytest.param([], [], "Failed", "JobRemoved", "training Job bot-train-1 disappeared before it finished",
                 id="job-vanished"),
    pytest.param([job("bot-train-1", active=1, deleting=True)], [], "Failed", "JobRemoved",
                 "training Job bot-train-1 disappeared before it finished", id="job-deleted-by-someone"),
])
def test_training(jobs: list[dict[str, Any]], pods: list[dict[str, Any]], phase: str, reason: str,
                  message: str) -> None:
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
    fail_fast = message.startswith("InvalidDataset")  # exit code 2: stop the Job's retries
    assert names(plan) == (["delete Job/bot-train-1"] if fail_fast else [])
    again = world.reconcile(LATER)
    assert (again.patch, again.actions) == ({}, ()), "not a fixed point"


def test_success_publishes_adapter_and_finalises_progress() -> None:
    world = running_world(progress={"step": 19, "totalSteps": 20, "percent": 95, "lastCheckpoint": "checkpoint-15"})
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    plan = world.step(LATER)
    assert plan.status["adapter"] == ADAPTER
    assert plan.patch["progress"] == {"percent": 100}
    assert world.status is not None and world.status["progress"]["step"] == 19  # the trainer's fields stay
    assert plan.status["attempts"] == 1


def test_terminal_is_final_even_if_the_job_vanishes() -> None:
    world = running_world()
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
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


@pytest.mark.parametrize(("pods", "vjob_kw", "reason", "message"), [
    pytest.param([vpod("Failed", exit_code=2, message=result(False, "InvalidDataset",
                                                             "train.jsonl line 3: invalid JSON"))],
                 {"failed": 1, "condition": "Failed", "reason": "BackoffLimitExceeded"},
                 "InvalidDataset", "pre-flight failed: train.jsonl line 3: invalid JSON", id="bad-dataset"),
    pytest.param([vpod("Failed", exit_code=2, message=result(False, "BaseModelUnavailable", "no config.json"))],
                 {"active": 1}, "BaseModelUnavailable", "pre-flight failed: no config.json",
                 id="pod-failed-before-job-condition"),
    pytest.param([vpod("Failed", exit_code=1, message="Traceback...\nMemoryError")],
                 {"failed": 1, "condition": "Failed", "reason": "BackoffLimitExceeded"},
                 "PreflightFailed", "pre-flight failed: Traceback... MemoryError", id="crash-logs"),
    pytest.param([], {"failed": 1, "condition": "Failed", "reason": "DeadlineExceeded"},
                 "PreflightFailed", "pre-flight failed: DeadlineExceeded", id="no-pod"),
    pytest.param([vpod("Succeeded", exit_code=0, message=result(False, "InvalidSpec", "lora.r too big"))],
                 {"succeeded": 1, "condition": "Complete"}, "InvalidSpec", "pre-flight failed: lora.r too big",
                 id="exit-0-but-not-ok"),
])
def test_preflight_failure_ends_failed_without_training(pods: list[dict[str, Any]], vjob_kw: dict[str, Any],
                                                         reason: str, message: str) -> None:
    world = World()
    world.step()
    world.jobs, world.pods = [vjob(**vjob_kw)], pods
    plan = world.step(LATER)
    assert (plan.phase, plan.message, plan.actions) == ("Failed", message, ())
    for ctype in ("Validated", "Running", "Succeeded", "Ready"):
        assert (cond(plan, ctype)["status"], cond(plan, ctype)["reason"]) == (
            "False", reason), ctype
    assert plan.status["completionTime"] == LATER
    assert "jobName" not in plan.status
    assert world.reconcile(LATER).patch == {}


def test_noop_preflight_without_result_passes() -> None:
    """Exit 0 with no TrainerResult (the scale benchmark's noop image) counts as passed."""
    world = World(jobs=[vjob(succeeded=1, condition="Complete")], pods=[vpod("Succeeded", exit_code=0)])
    world.step()
    plan = world.step()
    assert plan.phase == "Running" and cond(plan, "Validated")["message"] == "pre-flight passed"


@pytest.mark.parametrize(("spec", "fragment"), [
    pytest.param({"quantization": {"quantType": "nf4"}}, "spec: quantization is only used with method: qlora",
                 id="quantization-with-lora"),
    pytest.param({"dataset": {"uri": "pvc://data/x.jsonl", "evalSplit": 0.1, "evalUri": "pvc://data/e.jsonl"}},
                 "spec.dataset: dataset: set either evalSplit or evalUri", id="split-and-uri"),
    pytest.param({"lora": {"r": 0}}, "spec.lora.r: Input should be greater than or equal to 1", id="schema-rule"),
])
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


# --- spec changes ------------------------------------------------------------------------------


def config(revision: int = 1) -> TrainerRunConfig:
    return TrainerRunConfig(name="bot", namespace="ml", revision=revision, spec=LoRAJobSpec.model_validate(SPEC))


def test_training_field_change_while_running_is_reported_not_applied() -> None:
    world = running_world()
    world.put(job("bot-train-1", active=1))
    world.run_config = config()
    world.edit(training={"learningRate": 0.001}, lora={"r": 8})
    plan = world.step()
    assert plan.phase == "Running" and plan.actions == () and plan.status["revision"] == 1
    validated = cond(plan, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "SpecImmutable")
    assert validated["message"].startswith("spec.lora.r, spec.training.learningRate changed after training of "
                                           "revision 1 started")
    assert "new run when this one ends" in validated["message"]
    assert world.reconcile().patch == {}
    world.edit(training={"learningRate": 0.005}, lora={"r": 16})  # reverted
    assert cond(world.step(), "Validated")["reason"] == "ValidationPassed"


def test_pending_change_starts_a_new_revision_when_the_run_ends() -> None:
    world = running_world()
    world.run_config = config()
    world.edit(training={"learningRate": 0.001})
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    done = world.step(LATER)
    assert done.phase == "Succeeded" and done.requeue and done.status["adapter"] == ADAPTER
    world.status = dict(world.status or {}, progress={"step": 20, "percent": 100})
    nxt = world.step(LATER)
    assert nxt.phase == "Validating" and nxt.status["revision"] == 2 and not nxt.requeue
    assert names(nxt) == ["create ConfigMap/bot-trainer-2", "create Job/bot-validate-2"]
    assert nxt.patch["progress"] is None and nxt.patch["adapter"] is None and nxt.patch["jobName"] is None


def test_non_training_change_after_success_changes_nothing_but_generation() -> None:
    world = running_world()
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    world.step(LATER)
    world.run_config = config()
    world.edit(backoffLimit=5, resources={"gpus": 1})
    plan = world.step(LATER)
    assert plan.phase == "Succeeded" and plan.actions == () and plan.patch.keys() == {"observedGeneration",
                                                                                      "conditions"}


def test_change_during_preflight_restarts_preflight() -> None:
    world = World()
    world.step()
    world.run_config = config()
    world.edit(dataset={"uri": "pvc://data/fixed.jsonl"})
    plan = world.step()
    assert plan.status["revision"] == 2 and plan.phase == "Validating"
    assert names(plan) == ["delete Job/bot-validate-1", "create ConfigMap/bot-trainer-2",
                           "create Job/bot-validate-2"]


def test_change_after_preflight_failure_starts_a_new_revision() -> None:
    world = World(jobs=[vjob(failed=1, condition="Failed", reason="BackoffLimitExceeded")],
                  pods=[vpod("Failed", exit_code=2, message=result(False, "InvalidDataset", "line 3"))])
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


def test_suspend_deletes_the_job_and_resume_continues_from_checkpoint() -> None:
    world = running_world(progress={"step": 10, "lastCheckpoint": "checkpoint-10"})
    world.put(job("bot-train-1", active=1), pod("p1", "bot-train-1", "Running"))
    world.edit(suspend=True)
    suspended = world.step()
    assert suspended.phase == "Suspended" and names(suspended) == ["delete Job/bot-train-1"]
    assert cond(suspended, "Running")["reason"] == "Suspended"
    assert "checkpoint-10" in suspended.message
    assert world.reconcile().actions == ()  # the Job is terminating: not deleted twice

    world.edit(suspend=False)
    waiting = world.step()  # the old pod still runs: two trainers must never share a checkpoint dir
    assert waiting.phase == "Suspended" and waiting.actions == ()
    assert "waiting for pod p1" in waiting.message

    world.jobs = [j for j in world.jobs if j["metadata"]["name"] != "bot-train-1"]
    world.pods = [p for p in world.pods if p["metadata"]["name"] != "p1"]
    resumed = world.step(LATER)
    assert resumed.phase == "Running" and resumed.status["jobName"] == "bot-train-3"
    assert names(resumed)[-1] == "create Job/bot-train-3"
    assert resumed.status["revision"] == 1 and resumed.status["attempts"] == 1
    assert world.reconcile(LATER).patch == {}


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
    world.put(job("bot-train-1", succeeded=1, condition="Complete"),
              pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    world.edit(suspend=True)
    assert world.step().phase == "Succeeded"


# --- idempotency and robustness ----------------------------------------------------------------


@pytest.mark.parametrize("world", [
    pytest.param(World(), id="new"),
    pytest.param(World(jobs=[vjob(active=1)], pods=[vpod("Running")]), id="validating"),
    pytest.param(World(spec=merge(SPEC, {"lora": {"r": 0}})), id="invalid"),
])
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
            world.put(job("bot-train-1", succeeded=1, condition="Complete"),
                      pod("p1", "bot-train-1", "Succeeded", exit_code=0, message=result(adapter=True)))
    assert world.status is not None and world.status["phase"] == "Succeeded"
    assert world.reconcile().actions == ()


def test_garbage_in_status_is_dropped_not_fatal() -> None:
    world = World(status={"phase": "Nonsense", "attempts": "many", "conditions": "x", "foreign": 1})
    plan = world.reconcile()
    assert plan.phase == "Validating" and plan.status["attempts"] == 0
    assert "foreign" not in plan.patch  # not ours: left alone


@pytest.mark.parametrize(("event", "meta", "status", "expected"), [
    pytest.param(None, {}, {"phase": "Running", "observedGeneration": 1}, True, id="operator-start-resumes"),
    pytest.param("ADDED", {}, None, True, id="created"),
    pytest.param("MODIFIED", {}, {"phase": "Running", "observedGeneration": 1}, False, id="status-patch"),
    pytest.param("MODIFIED", {"generation": 2}, {"phase": "Running", "observedGeneration": 1}, True,
                 id="spec-changed"),
    pytest.param("MODIFIED", {}, {"progress": {"step": 3}}, True, id="status-wiped"),
    pytest.param("MODIFIED", {"deletionTimestamp": "t"}, {"phase": "Running"}, False, id="being-deleted"),
    pytest.param("DELETED", {}, {"phase": "Running", "observedGeneration": 1}, False, id="deleted"),
])
def test_needs_reconcile(event: str | None, meta: dict[str, Any], status: dict[str, Any] | None,
                         expected: bool) -> None:
    body: dict[str, Any] = {"metadata": {"name": "bot", "generation": 1, **meta}}
    if status is not None:
        body["status"] = status
    assert needs_reconcile(event, body) is expected
