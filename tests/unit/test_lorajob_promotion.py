"""Evaluation gate and promotion: the pure verdict, the LoRAJob status it gives (Promoted, promotedAdapter,
a Warning Event once), and the adapter an AdapterDeployment following the LoRAJob resolves to."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.evaluation import EvalMetrics, EvaluationGate, EvaluationResult, gate_failures, with_gate
from kubelora.reconcile.adapterdeployment_refs import job_view, resolve_adapters

from .test_lorajob_world import (
    ADAPTER,
    LATER,
    SPEC,
    World,
    cond,
    config,
    job,
    merge,
    pod,
    result,
    running_world,
    vjob,
    vpod,
)

GOOD = {"evalRows": 10, "adapter": {"loss": 1.0, "perplexity": 2.718}, "base": {"loss": 2.0}, "improvement": 0.5}
BAD = {"evalRows": 10, "adapter": {"loss": 1.9}, "base": {"loss": 2.0}, "improvement": 0.05}
ADAPTER_2 = {**ADAPTER, "uri": "pvc://adapters/bot/rev-2", "digest": "sha256:" + "cd" * 32}


def trained(evaluation: dict[str, Any] | None, adapter: dict[str, Any] = ADAPTER) -> str:
    data = json.loads(result(adapter=True))
    data["adapter"] = adapter
    if evaluation is not None:
        data["evaluation"] = evaluation
    return json.dumps(data)


def finish(world: World, evaluation: dict[str, Any] | None, revision: int = 1,
           adapter: dict[str, Any] = ADAPTER) -> Any:
    name = f"bot-train-{world.generation}"
    world.put(job(name, revision, succeeded=1, condition="Complete"),
              pod(f"{name}-p", name, "Succeeded", revision=revision, exit_code=0, message=trained(evaluation, adapter)))
    return world.step(LATER)


def gated(**gate: Any) -> dict[str, Any]:
    return merge(SPEC, {"evaluation": {"gate": gate}})


# --- the verdict ---------------------------------------------------------------------------------------


def metrics(loss: float | None, base: float | None, sim: float | None = None) -> EvaluationResult:
    imp = (base - loss) / base if loss is not None and base else None
    return EvaluationResult(adapter=EvalMetrics(loss=loss, similarity=sim),
                            base=EvalMetrics(loss=base) if base is not None else None, improvement=imp)


@pytest.mark.parametrize(
    ("gate", "measured", "failures"),
    [
        pytest.param({"maxEvalLoss": 1.5}, metrics(1.0, 2.0), [], id="loss-under-max"),
        pytest.param({"maxEvalLoss": 0.5}, metrics(1.0, 2.0), ["eval loss 1.0000 > maxEvalLoss 0.5"], id="loss-over"),
        pytest.param({"minImprovement": 0.1}, metrics(1.9, 2.0),
                     ["improvement 5.0% over the base (eval loss 2.0000 -> 1.9000) < minImprovement 10.0%"],
                     id="improvement-short"),
        pytest.param({"minImprovement": 0.1}, metrics(1.0, None),
                     ["no base-model comparison was measured but minImprovement is set (compareBase, eval set)"],
                     id="no-base"),
        pytest.param({"maxEvalLoss": 3}, metrics(None, None),
                     ["no eval loss was measured (no eval set) but maxEvalLoss is set"], id="no-eval-set"),
        pytest.param({"minSimilarity": 0.85}, metrics(1.0, 2.0, 0.9), [], id="similar-enough"),
        pytest.param({"minSimilarity": 0.85}, metrics(1.0, 2.0, 0.5),
                     ["reference similarity 0.500 < minSimilarity 0.85"], id="not-similar"),
        pytest.param({"maxEvalLoss": 0.5, "minSimilarity": 0.85}, metrics(1.0, 2.0, 0.5),
                     ["eval loss 1.0000 > maxEvalLoss 0.5", "reference similarity 0.500 < minSimilarity 0.85"],
                     id="every-miss-named"),
    ],
)
def test_gate_failures(gate: dict[str, Any], measured: EvaluationResult, failures: list[str]) -> None:
    parsed = EvaluationGate.model_validate(gate)
    assert gate_failures(parsed, measured) == failures
    verdict = with_gate(parsed, measured)
    assert verdict.gate_passed is (not failures)
    assert verdict.gate_message == ("; ".join(failures) or "every bound of spec.evaluation.gate is met")


def test_a_gate_needs_a_bound_and_similarity_needs_references() -> None:
    with pytest.raises(ValueError, match="set at least one of maxEvalLoss"):
        EvaluationGate.model_validate({})
    from kubelora.api.lorajob import LoRAJobSpec

    with pytest.raises(ValueError, match="minSimilarity needs reference answers"):
        LoRAJobSpec.model_validate(gated(minSimilarity=0.8))
    LoRAJobSpec.model_validate(merge(gated(minSimilarity=0.8), {"evaluation": {
        "references": [{"prompt": "What colour is the sky?", "reference": "The sky is blue."}]}}))


# --- LoRAJob status --------------------------------------------------------------------------------------


def test_no_gate_promotes_every_published_adapter() -> None:
    world = running_world()
    plan = finish(world, GOOD)
    promoted = cond(plan, "Promoted")
    assert (promoted["status"], promoted["reason"]) == ("True", "NoGate")
    assert plan.status["promotedAdapter"] == ADAPTER and plan.status["evaluation"]["improvement"] == 0.5
    assert plan.warnings == () and world.reconcile(LATER).patch == {}


def test_a_passed_gate_promotes() -> None:
    world = World(spec=gated(minImprovement=0.1))
    world.jobs, world.pods = [vjob(succeeded=1, condition="Complete")], [vpod("Succeeded", exit_code=0,
                                                                             message=result(validation=True))]
    world.step(), world.step()
    plan = finish(world, GOOD)
    promoted = cond(plan, "Promoted")
    assert (promoted["status"], promoted["reason"]) == ("True", "GatePassed")
    assert promoted["observedGeneration"] == 1
    assert plan.status["evaluation"]["gatePassed"] is True and plan.status["promotedAdapter"] == ADAPTER


def test_a_missed_gate_succeeds_publishes_and_is_not_promoted() -> None:
    world = World(spec=gated(minImprovement=0.1))
    world.jobs, world.pods = [vjob(succeeded=1, condition="Complete")], [vpod("Succeeded", exit_code=0,
                                                                             message=result(validation=True))]
    world.step(), world.step()
    plan = finish(world, BAD)
    assert plan.phase == "Succeeded" and plan.status["adapter"] == ADAPTER
    assert cond(plan, "Ready")["status"] == "True" and cond(plan, "Stalled")["status"] == "False"
    promoted = cond(plan, "Promoted")
    assert (promoted["status"], promoted["reason"]) == ("False", "GateFailed")
    assert promoted["message"] == ("revision 1 missed spec.evaluation.gate: improvement 5.0% over the base (eval "
                                   "loss 2.0000 -> 1.9000) < minImprovement 10.0%; no adapter of this LoRAJob is "
                                   "promoted yet")
    assert "promotedAdapter" not in plan.status and plan.status["evaluation"]["gatePassed"] is False
    assert plan.warnings == (("GateFailed", promoted["message"]),)
    again = world.reconcile(LATER)
    assert (again.patch, again.warnings) == ({}, ()), "one Event per run, and a fixed point"


def test_a_gate_without_measurements_does_not_promote() -> None:
    """A lost evaluation (an old trainer, a lost termination message) is not a pass."""
    world = World(spec=gated(maxEvalLoss=2.0))
    world.jobs, world.pods = [vjob(succeeded=1, condition="Complete")], [vpod("Succeeded", exit_code=0,
                                                                             message=result(validation=True))]
    world.step(), world.step()
    plan = finish(world, None)
    assert cond(plan, "Promoted")["reason"] == "GateFailed"
    assert "no eval loss was measured" in cond(plan, "Promoted")["message"]


def test_a_retrain_that_misses_the_gate_keeps_the_promoted_adapter() -> None:
    world = running_world()
    world.run_config = config()
    finish(world, GOOD)
    world.edit(evaluation={"gate": {"minImprovement": 0.1}})
    restarted = world.step(LATER)
    assert restarted.status["revision"] == 2 and restarted.status["promotedAdapter"] == ADAPTER
    assert (cond(restarted, "Promoted")["status"], cond(restarted, "Promoted")["reason"]) == ("Unknown",
                                                                                             "NotEvaluated")
    world.put(vjob(2, succeeded=1, condition="Complete"),
              vpod("Succeeded", 2, exit_code=0, message=result(validation=True)))
    world.step(LATER), world.step(LATER)
    assert world.status is not None and world.status["phase"] == "Running"
    plan = finish(world, BAD, revision=2, adapter=ADAPTER_2)
    assert plan.phase == "Succeeded" and plan.status["adapter"] == ADAPTER_2
    assert plan.status["promotedAdapter"] == ADAPTER and plan.status["lastSucceededAdapter"] == ADAPTER_2
    assert cond(plan, "Promoted")["message"].endswith(f"serving stays on {ADAPTER['uri']} ({ADAPTER['digest']})")


def test_a_status_from_before_promotion_promotes_its_adapter() -> None:
    world = running_world()
    finish(world, None)
    assert world.status is not None
    legacy = {k: v for k, v in world.status.items() if k not in ("promotedAdapter", "evaluation")}
    legacy["conditions"] = [c for c in legacy["conditions"] if c["type"] != "Promoted"]
    world.status = legacy
    plan = world.reconcile(LATER)
    assert plan.patch["promotedAdapter"] == ADAPTER and cond(plan, "Promoted")["reason"] == "NoGate"


# --- AdapterDeployment following the LoRAJob -------------------------------------------------------------

DEPLOYMENT = AdapterDeploymentSpec.model_validate({
    "baseModel": {"uri": "pvc://models/tiny", "servedName": "tiny"},
    "adapters": [{"name": "bot", "loraJobRef": {"name": "bot"}}],
})


def lorajob(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "bot"}, "spec": copy.deepcopy(SPEC), "status": status}


def gate_failed(promoted: dict[str, Any] | None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Succeeded", "adapter": ADAPTER_2, "conditions": [
        {"type": "Promoted", "status": "False", "reason": "GateFailed", "message": "revision 2 missed the gate"}]}
    if promoted:
        status["promotedAdapter"] = promoted
    return status


def test_a_deployment_keeps_serving_the_promoted_adapter_when_a_run_misses_its_gate() -> None:
    [resolved] = resolve_adapters(DEPLOYMENT, {"bot": job_view(lorajob(gate_failed(ADAPTER)))})
    assert (resolved.uri, resolved.digest, resolved.verdict) == (ADAPTER["uri"], ADAPTER["digest"], None)
    assert resolved.reason == "GateFailed" and resolved.message == "LoRAJob 'bot': revision 2 missed the gate"


def test_a_deployment_waits_when_nothing_was_ever_promoted() -> None:
    [resolved] = resolve_adapters(DEPLOYMENT, {"bot": job_view(lorajob(gate_failed(None)))})
    assert (resolved.verdict, resolved.reason, resolved.desired) == ("Pending", "GateFailed", None)
    assert resolved.claim_uri == "pvc://adapters/bot"


def test_a_deployment_serves_the_promoted_adapter_while_a_retrain_runs() -> None:
    status = {"phase": "Running", "promotedAdapter": ADAPTER, "conditions": [
        {"type": "Promoted", "status": "Unknown", "reason": "NotEvaluated", "message": "revision 2 ..."}]}
    [resolved] = resolve_adapters(DEPLOYMENT, {"bot": job_view(lorajob(status))})
    assert (resolved.uri, resolved.verdict, resolved.reason) == (ADAPTER["uri"], None, "LoRAJobNotReady")


@pytest.mark.parametrize("promoted", [pytest.param(True, id="promoted"), pytest.param(False, id="before-promotion")])
def test_a_promoted_or_legacy_adapter_is_served(promoted: bool) -> None:
    status: dict[str, Any] = {"phase": "Succeeded", "adapter": ADAPTER_2}
    if promoted:
        status.update(promotedAdapter=ADAPTER_2, conditions=[{"type": "Promoted", "status": "True",
                                                              "reason": "GatePassed", "message": "ok"}])
    [resolved] = resolve_adapters(DEPLOYMENT, {"bot": job_view(lorajob(status))})
    assert (resolved.uri, resolved.verdict, resolved.reason) == (ADAPTER_2["uri"], None, "")
