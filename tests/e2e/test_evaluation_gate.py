"""The evaluation gate on the local cluster, watched through an AdapterDeployment that follows the LoRAJob:
a run whose gate passes is promoted and served; a retrain whose gate fails ends Succeeded with Promoted=False
(and a Warning Event), its adapter is published, and the deployment keeps serving the first adapter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora_local.tinymodel import write_chat_dataset

from .test_adapterdeployment import (
    BASE_URI,
    FAKE_LORAJOB,
    GROUP_PATH,
    READY_TIMEOUT,
    Env,
    adapter_deployment,
    chat,
    env,  # noqa: F401  (the fixture)
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(FAKE_LORAJOB, reason="needs the real trainer's evaluation")]
Obj = dict[str, Any]


def gated_lorajob(name: str, max_eval_loss: float) -> Obj:
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": BASE_URI},
            "dataset": {"uri": "pvc://data/chat.jsonl", "evalSplit": 0.1},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "training": {"maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 5e-3,
                         "maxSeqLength": 128, "optimizer": "adamw_torch", "gradientCheckpointing": False,
                         "evalSteps": 2, "saveSteps": 2},
            "evaluation": {"samples": 1, "maxNewTokens": 8, "gate": {"maxEvalLoss": max_eval_loss}},
            "resources": {"gpus": 0},
            "output": {"uri": f"pvc://adapters/{name}"},
        },
    }


def condition(status: Obj, ctype: str) -> Obj:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def test_a_missed_gate_keeps_the_deployment_on_the_promoted_adapter(env: Env) -> None:  # noqa: F811
    kube, wait = env.cluster.kube, env.cluster.wait_for
    write_chat_dataset(env.cluster.pvc_dir(env.ns, "data") / "chat.jsonl", n=32)
    kube.create(f"{GROUP_PATH}/{env.ns}/lorajobs", gated_lorajob("gated", max_eval_loss=100.0))
    path = f"{GROUP_PATH}/{env.ns}/lorajobs/gated"

    def finished(revision: int) -> Obj | None:
        status: Obj = kube.get(path).get("status") or {}
        done = status.get("revision") == revision and status.get("phase") in ("Succeeded", "Failed")
        return status if done and condition(status, "Promoted").get("status") in ("True", "False") else None

    first_run = wait(lambda: finished(1), timeout=READY_TIMEOUT, what="revision 1 evaluated")
    assert first_run["phase"] == "Succeeded", first_run.get("message")
    promoted = condition(first_run, "Promoted")
    assert (promoted["status"], promoted["reason"]) == ("True", "GatePassed"), promoted
    first = first_run["adapter"]
    assert first_run["promotedAdapter"] == first
    evaluation = first_run["evaluation"]
    assert evaluation["gatePassed"] is True and evaluation["adapter"]["loss"] < 100.0
    assert evaluation["base"]["loss"] > 0 and len(evaluation["samples"]) == 1

    kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments",
                adapter_deployment("gated", [{"name": "support", "loraJobRef": {"name": "gated"}}]))
    assert env.wait_adapters("gated", {"support": "Loaded"})["support"]["digest"] == first["digest"]
    pod = env.ready_pod("gated")

    # A retrain with a gate no adapter can meet: a training field changes, so a new revision runs.
    kube.merge_patch(path, {"spec": {"evaluation": {"gate": {"maxEvalLoss": 1e-6}}}})
    second_run = wait(lambda: finished(2), timeout=READY_TIMEOUT, what="revision 2 evaluated")
    assert second_run["phase"] == "Succeeded", second_run.get("message")
    assert condition(second_run, "Ready")["status"] == "True"
    missed = condition(second_run, "Promoted")
    assert (missed["status"], missed["reason"], missed["observedGeneration"]) == ("False", "GateFailed", 2)
    assert "> maxEvalLoss 1e-06" in missed["message"] and first["uri"] in missed["message"]
    second = second_run["adapter"]
    assert second["uri"].endswith("/rev-2") and second["digest"] != first["digest"]
    assert second_run["promotedAdapter"] == first and second_run["evaluation"]["gatePassed"] is False
    assert second_run["observedGeneration"] == 2
    wait(lambda: [e for e in kube.get(f"/api/v1/namespaces/{env.ns}/events",
                                      fieldSelector="involvedObject.name=gated")["items"]
                  if e["reason"] == "GateFailed" and e["type"] == "Warning"] or None,
         timeout=30, what="the GateFailed Warning Event")

    # The deployment says why it stays, and keeps serving the first adapter.
    def noted() -> Obj | None:
        support = env.adapters("gated").get("support") or {}
        return support if support.get("reason") == "GateFailed" else None

    support = wait(noted, timeout=60, what="the GateFailed note on the served adapter")
    assert (support["state"], support["digest"]) == ("Loaded", first["digest"])
    desired = json.loads(kube.get(f"/api/v1/namespaces/{env.ns}/configmaps/gated-adapters")["data"]["adapters.json"])
    assert desired["adapters"] == [{"name": "support", "uri": first["uri"], "digest": first["digest"]}]
    assert chat(pod, "support").status_code == 200
