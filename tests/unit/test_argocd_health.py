"""The Argo CD health checks in charts/kubelora/health/, run on Lua 5.1 as Argo CD runs them (tests/argocd_health.py).

One object per state a user meets, for both kinds, with the status and message Argo CD would show; the
LoRAJob verdict for each phase as the operator's own status code writes it; and the shipped copies (the
chart's ConfigMap, docs/argocd.md) hold exactly the Lua of the files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.api.reasons import ConditionType, JobPhase, Reason
from kubelora.reconcile.lorajob_status import Outcome, Verdict, conditions
from tests.argocd_health import SCRIPTS, Health, health, key
from tests.unit.test_chart import render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "argocd.md"
Obj = dict[str, Any]


def cond(ctype: str, status: str, reason: str = "", message: str = "", generation: int = 1) -> Obj:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "observedGeneration": generation,
            "lastTransitionTime": "2026-12-01T00:00:00Z"}


def obj(kind: str, generation: int = 1, status: Obj | None = None) -> Obj:
    body: Obj = {"apiVersion": "kubelora.io/v1alpha1", "kind": kind,
                 "metadata": {"name": "x", "namespace": "ml", "generation": generation, "uid": "u-1"},
                 "spec": {}}
    if status is not None:
        body["status"] = status
    return body


def lorajob(phase: str, ready: str, reconciling: str, stalled: str, message: str, generation: int = 1,
            observed: int | None = 1, reason: str = "") -> Obj:
    status: Obj = {"phase": phase, "message": message, "conditions": [
        cond("Ready", ready, reason, message), cond("Reconciling", reconciling, reason, message),
        cond("Stalled", stalled, reason, message)]}
    if observed is not None:
        status["observedGeneration"] = observed
    return obj("LoRAJob", generation, status)


def deployment(phase: str, ready: str, reconciling: str, stalled: str, degraded: str, message: str,
               degraded_message: str = "", generation: int = 1, observed: int | None = 1) -> Obj:
    status: Obj = {"phase": phase, "message": message, "replicas": 1, "readyReplicas": 1, "adaptersReady": "1/1",
                   "conditions": [cond("Degraded", degraded, "AdaptersFailed", degraded_message),
                                  cond("Progressing", reconciling, "AdaptersPending", message),
                                  cond("Ready", ready, "AllReady", message),
                                  cond("Reconciling", reconciling, "AdaptersPending", message),
                                  cond("Stalled", stalled, "InvalidSpec", message if stalled == "True" else "")]}
    if observed is not None:
        status["observedGeneration"] = observed
    return obj("AdapterDeployment", generation, status)


PREFLIGHT = "pre-flight Job bot-validate-1 checks the dataset and base model"
LORAJOB_CASES = [
    pytest.param(obj("LoRAJob"), Health("Progressing", "waiting for the operator to observe generation 1"),
                 id="pending-no-status"),
    pytest.param(lorajob("Validating", "False", "True", "False", PREFLIGHT, reason="Validating"),
                 Health("Progressing", PREFLIGHT), id="preflight-validating"),
    pytest.param(lorajob("Queued", "False", "True", "False", "waiting in LocalQueue team-a for quota",
                         reason="Queued"),
                 Health("Progressing", "waiting in LocalQueue team-a for quota"), id="queued-in-kueue"),
    pytest.param(lorajob("Running", "False", "True", "False", "training: step 40/100, loss 1.23",
                         reason="Training"),
                 Health("Progressing", "training: step 40/100, loss 1.23"), id="training"),
    pytest.param(lorajob("Running", "False", "True", "False", "0/1 nodes are available: Insufficient nvidia.com/gpu",
                         reason="Unschedulable"),
                 Health("Progressing", "0/1 nodes are available: Insufficient nvidia.com/gpu"), id="unschedulable"),
    pytest.param(lorajob("Suspended", "True", "False", "False",
                         "suspended; checkpoints are kept. Set spec.suspend to false to resume", generation=3,
                         observed=3, reason="Suspended"),
                 Health("Suspended", "suspended; checkpoints are kept. Set spec.suspend to false to resume"),
                 id="suspended"),
    pytest.param(lorajob("Succeeded", "True", "False", "False", "adapter published: pvc://adapters/bot/rev-1",
                         reason="Completed"),
                 Health("Healthy", "adapter published: pvc://adapters/bot/rev-1"), id="succeeded"),
    pytest.param(lorajob("Failed", "False", "False", "True", "dataset line 3: invalid JSON", reason="InvalidDataset"),
                 Health("Degraded", "dataset line 3: invalid JSON"), id="failed-preflight"),
    pytest.param(lorajob("Failed", "False", "False", "True", "invalid spec: spec.quantization is only used with "
                         "method: qlora", reason="InvalidSpec"),
                 Health("Degraded", "invalid spec: spec.quantization is only used with method: qlora"),
                 id="bad-spec-stalled"),
    pytest.param(lorajob("Running", "False", "True", "False", "training: step 40/100", generation=2, observed=1),
                 Health("Progressing", "waiting for the operator to observe generation 2"),
                 id="stale-observed-generation"),
    pytest.param(lorajob("Failed", "False", "False", "True", "dataset line 3: invalid JSON", generation=2, observed=1),
                 Health("Progressing", "waiting for the operator to observe generation 2"),
                 id="stale-failure-of-an-edited-spec"),
    pytest.param(lorajob("", "False", "False", "True", 'jobs.batch is forbidden: exceeded quota: no-jobs',
                         observed=None, reason="Forbidden"),
                 Health("Degraded", "jobs.batch is forbidden: exceeded quota: no-jobs"),
                 id="refused-create-stalled-before-observing"),
    pytest.param(obj("LoRAJob", status={"progress": {"step": 1}}),
                 Health("Progressing", "waiting for the operator to observe generation 1"),
                 id="progress-only-no-observed-generation"),
    pytest.param(obj("LoRAJob", status={"phase": "Failed", "observedGeneration": 1, "message": "backoff limit"}),
                 Health("Degraded", "backoff limit"), id="failed-without-conditions"),
]


@pytest.mark.parametrize(("body", "expected"), LORAJOB_CASES)
def test_lorajob(body: Obj, expected: Health) -> None:
    assert health(body) == expected


AD_CASES = [
    pytest.param(obj("AdapterDeployment", generation=4),
                 Health("Progressing", "waiting for the operator to observe generation 4"), id="no-status"),
    pytest.param(deployment("Pending", "False", "True", "False", "False", "0/1 replicas ready"),
                 Health("Progressing", "0/1 replicas ready"), id="pending-pods-start"),
    pytest.param(deployment("Progressing", "False", "True", "False", "False", "adapters loading: support (1/2)"),
                 Health("Progressing", "adapters loading: support (1/2)"), id="progressing-adapters-load"),
    pytest.param(deployment("Ready", "True", "False", "False", "False", "1/1 replicas ready"),
                 Health("Healthy", "1/1 replicas ready"), id="ready"),
    pytest.param(deployment("Degraded", "True", "False", "False", "True", "1/1 replicas ready",
                            "adapter corrupt failed: DigestMismatch"),
                 Health("Degraded", "adapter corrupt failed: DigestMismatch"), id="degraded-failed-adapter"),
    pytest.param(deployment("Degraded", "False", "True", "False", "True", "adapters loading: b (0/1)",
                            "adapter a failed: LoadFailed"),
                 Health("Degraded", "adapter a failed: LoadFailed"), id="degraded-while-others-load"),
    pytest.param(deployment("Failed", "False", "False", "True", "False",
                            "invalid spec: spec.baseModel.uri must be hf://, pvc:// or file://"),
                 Health("Degraded", "invalid spec: spec.baseModel.uri must be hf://, pvc:// or file://"),
                 id="stalled-invalid-spec"),
    pytest.param(deployment("Ready", "True", "False", "False", "False", "1/1 replicas ready", generation=2),
                 Health("Progressing", "waiting for the operator to observe generation 2"),
                 id="stale-observed-generation"),
]


@pytest.mark.parametrize(("body", "expected"), AD_CASES)
def test_adapterdeployment(body: Obj, expected: Health) -> None:
    assert health(body) == expected


EXPECTED_FOR_PHASE = {
    JobPhase.PENDING: "Progressing", JobPhase.VALIDATING: "Progressing", JobPhase.QUEUED: "Progressing",
    JobPhase.RUNNING: "Progressing", JobPhase.SUSPENDED: "Suspended", JobPhase.SUCCEEDED: "Healthy",
    JobPhase.FAILED: "Degraded",
}


@pytest.mark.parametrize("phase", list(JobPhase))
def test_lorajob_phase_as_the_operator_writes_it(phase: JobPhase) -> None:
    """The operator's own condition code and the Lua agree on every phase (a new phase fails here first)."""
    outcome = Outcome(phase, Reason.TRAINING, f"the run is {phase}", Verdict("True", Reason.VALIDATION_PASSED, "ok"))
    rows = conditions([], outcome, None, 2, "2026-12-01T00:00:00Z")
    status = {"phase": str(phase), "observedGeneration": 2, "message": outcome.message,
              "conditions": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in rows]}
    assert {c["type"] for c in status["conditions"]} >= {ConditionType.READY, ConditionType.STALLED}
    assert health(obj("LoRAJob", 2, status)) == Health(EXPECTED_FOR_PHASE[phase], f"the run is {phase}")


@pytest.mark.parametrize("kind", list(SCRIPTS))
def test_scripts_use_no_string_library(kind: str) -> None:
    """Argo CD opens only base and table: a script calling string.*, math.* or s:method() errors there."""
    source = SCRIPTS[kind].read_text()
    assert not re.search(r"\b(string|math|io|os|debug)\.", source)
    assert source.endswith("return say(\"Progressing\", \"Ready\")\n"), "one trailing newline, as YAML `|` keeps"


def test_a_broken_check_is_caught() -> None:
    """The harness notices a wrong verdict, a runtime error and a status Argo CD does not know."""
    good = SCRIPTS["LoRAJob"].read_text()
    broken = good.replace('return say("Healthy", "Ready")', 'return say("Progressing", "Ready")')
    succeeded = next(p.values[0] for p in LORAJOB_CASES if p.id == "succeeded")
    assert health(succeeded).status == "Healthy" and health(succeeded, broken).status == "Progressing"
    with pytest.raises(Exception, match="attempt to index"):
        health(obj("LoRAJob", status={"phase": "Running"}), good.replace("obj.status", "obj.statuz.x"))
    assert health(obj("LoRAJob"), 'return {status = "Fine"}').status == "Unknown"


def test_chart_renders_the_checks_only_when_asked() -> None:
    assert not [d for d in render() if d["metadata"]["name"].endswith("argocd-health")]
    [cm] = [d for d in render("argocd.healthChecks.enabled=true") if d["metadata"]["name"] == "kl-argocd-health"]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "kubelora-system"
    assert cm["data"] == {key(kind): path.read_text() for kind, path in SCRIPTS.items()}


def _yaml_blocks(text: str) -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]


def test_docs_carry_the_exact_lua() -> None:
    """Each copy-paste form in docs/argocd.md holds the files' Lua byte for byte."""
    blocks = _yaml_blocks(DOCS.read_text())
    files = {key(kind): path.read_text() for kind, path in SCRIPTS.items()}
    helm_values = next(b["configs"]["cm"] for b in blocks if isinstance(b, dict) and "configs" in b)
    assert {k: v for k, v in helm_values.items() if k in files} == files, "Argo CD Helm chart values"
    patch = next(b["data"] for b in blocks if isinstance(b, dict) and set(b) == {"data"})
    assert patch == files, "the argocd-cm merge patch"
    operator_cr = next(b for b in blocks if isinstance(b, dict) and b.get("kind") == "ArgoCD")
    checks = {f"resource.customizations.health.{c['group']}_{c['kind']}": c["check"]
              for c in operator_cr["spec"]["resourceHealthChecks"]}
    assert checks == files, "the argocd-operator ArgoCD resource"
