"""A stand-in for the cluster in the pure LoRAJob reconcile tests (plus a check of the stand-in itself).

``World`` applies a plan as the API server would (merge-patches the status, makes created Jobs appear,
marks deleted ones as terminating), so tests can check that a reconcile reaches a fixed point: the next
reconcile with the same facts writes nothing and does nothing.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.runtime import TrainerRunConfig
from kubelora.reconcile.lorajob import Plan, reconcile
from kubelora.reconcile.lorajob_actions import Create, Delete, Suspend
from kubelora.reconcile.lorajob_object import parse_lorajob
from kubelora.reconcile.lorajob_observed import observe
from kubelora.settings import Settings

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T01:00:00Z"
DIGEST = "sha256:" + "ab" * 32
SPEC: dict[str, Any] = {
    "baseModel": {"uri": "pvc://models/tiny"},
    "dataset": {"uri": "pvc://data/train.jsonl"},
    "output": {"uri": "pvc://adapters/bot"},
    "method": "lora",
    "resources": {"gpus": 0},
    "training": {"maxSteps": 20, "saveSteps": 5, "learningRate": 0.005},
    "backoffLimit": 2,
}
SETTINGS = Settings(trainer_image="ghcr.io/kubelora/trainer:test")
ADAPTER = {
    "uri": "pvc://adapters/bot/rev-1",
    "digest": DIGEST,
    "sizeBytes": 1234,
    "rank": 16,
    "baseModel": "pvc://models/tiny",
    "peftType": "LORA",
}


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


def result(
    ok: bool = True, reason: str = "", message: str = "", adapter: bool = False, validation: bool = False
) -> str:
    data: dict[str, Any] = {"ok": ok, "reason": reason, "message": message}
    if adapter:
        data["adapter"] = ADAPTER
    if validation:
        data["validation"] = {"trainRows": 90, "evalRows": 10, "format": "messages"}
    return json.dumps(data)


def job(
    name: str,
    revision: int = 1,
    *,
    component: str = "trainer",
    active: int = 0,
    succeeded: int = 0,
    failed: int = 0,
    condition: str | None = None,
    reason: str = "",
    deleting: bool = False,
    created: str = NOW,
    owner: str = "uid-bot",
    suspend: bool = False,
    queue: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"active": active, "succeeded": succeeded, "failed": failed}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": reason}]
        status["completionTime"] = LATER if condition == "Complete" else None
    meta: dict[str, Any] = {
        "name": name,
        "uid": f"uid-{name}",
        "creationTimestamp": created,
        "labels": {
            "kubelora.io/lorajob": "bot",
            "app.kubernetes.io/component": component,
            "kubelora.io/revision": str(revision),
        },
        "ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": owner, "controller": True}],
    }
    if queue:
        meta["labels"]["kueue.x-k8s.io/queue-name"] = queue
    if deleting:
        meta["deletionTimestamp"] = LATER
    return {"metadata": meta, "spec": {"suspend": suspend}, "status": status}


def pod(
    name: str,
    job_name: str,
    phase: str = "Pending",
    *,
    exit_code: int | None = None,
    message: str = "",
    component: str = "trainer",
    revision: int = 1,
    created: str = NOW,
    conditions: list[dict[str, Any]] | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if conditions:
        status["conditions"] = conditions
    if waiting:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": waiting, "message": "m"}}}]
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": "Completed" if exit_code == 0 else "Error",
                        "message": message,
                    }
                },
            }
        ]
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {
                "job-name": job_name,
                "kubelora.io/lorajob": "bot",
                "app.kubernetes.io/component": component,
                "kubelora.io/revision": str(revision),
            },
            "ownerReferences": [{"kind": "Job", "name": job_name, "uid": f"uid-{job_name}", "controller": True}],
        },
        "status": status,
    }


def vjob(revision: int = 1, **kw: Any) -> dict[str, Any]:
    return job(f"bot-validate-{revision}", revision, component="preflight", **kw)


def vpod(phase: str, revision: int = 1, **kw: Any) -> dict[str, Any]:
    return pod(
        f"bot-validate-{revision}-abcde",
        f"bot-validate-{revision}",
        phase,
        component="preflight",
        revision=revision,
        **kw,
    )


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
        body: dict[str, Any] = {
            "apiVersion": "kubelora.io/v1alpha1",
            "kind": "LoRAJob",
            "spec": self.spec,
            "metadata": {"name": "bot", "namespace": "ml", "uid": "uid-bot", "generation": self.generation},
        }
        if self.status is not None:
            body["status"] = self.status
        return body

    def edit(self, **spec: Any) -> World:
        """A spec change as the API server records it: new generation."""
        self.spec = merge(self.spec, spec)
        self.generation += 1
        return self

    def reconcile(self, now: str = NOW) -> Plan:
        return reconcile(parse_lorajob(self.body), observe(self.jobs, self.pods), self.run_config, SETTINGS, now)

    def apply(self, plan: Plan) -> World:
        self.status = merge(self.status or {}, plan.patch)
        for action in plan.actions:
            if isinstance(action, Create) and action.kind == "Job":
                labels = action.manifest["metadata"]["labels"]
                self.jobs.append(
                    job(
                        action.name,
                        int(labels["kubelora.io/revision"]),
                        component=labels["app.kubernetes.io/component"],
                        suspend=action.manifest["spec"].get("suspend", False),
                        queue=labels.get("kueue.x-k8s.io/queue-name"),
                    )
                )
            elif isinstance(action, Suspend):
                for j in self.jobs:
                    if j["metadata"]["name"] == action.name:
                        j["spec"]["suspend"] = action.suspend
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
    world = World(
        jobs=[vjob(succeeded=1, condition="Complete")],
        pods=[vpod("Succeeded", exit_code=0, message=result(validation=True))],
    )
    world.step()
    world.step()
    assert world.status is not None and world.status["phase"] == "Running"
    world.status.update(status)
    return world


def config(revision: int = 1) -> TrainerRunConfig:
    """The run config of ``revision`` as its ConfigMap holds it (the spec it started with)."""
    return TrainerRunConfig(name="bot", namespace="ml", revision=revision, spec=LoRAJobSpec.model_validate(SPEC))


def test_merge_patch_semantics() -> None:
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None}, "d": [1]}) == {"a": {"c": 2}, "d": [1]}
