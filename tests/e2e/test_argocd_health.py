"""The chart's Argo CD health checks on live objects of the local cluster, run as Argo CD runs them
(tests/argocd_health.py, real Lua 5.1), while the real operator brings each object through its phases; and
the documented ``kubectl patch`` commands really merge the checks into an ``argocd-cm``.

Kept cheap: two pre-flight pods and a four-step CPU run for LoRAJob (a bad dataset, a run created
suspended, resumed while the operator is down, then succeeding); one serving pod for AdapterDeployment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora_local.kube import KubeError
from kubelora_local.tinymodel import build_tiny_model
from tests.argocd_health import SCRIPTS, Health, health, key

from . import test_adapterdeployment as ad
from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_lorajob import Env, make_env, spec

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
WAITING = "waiting for the operator to observe generation"


def condition(obj: Obj, ctype: str) -> Obj:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def current(obj: Obj) -> bool:
    return (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]


@pytest.fixture
def env(cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> Env:
    return make_env(cluster, namespace, operator)


def test_lorajob_health_through_its_phases(env: Env) -> None:
    data = env.cluster.pvc_dir(env.ns, "data")
    rows = (data / "chat.jsonl").read_text().splitlines()
    (data / "broken.jsonl").write_text("\n".join([rows[0], '{"messages": [{"role": "user"', *rows[1:6]]) + "\n")
    env.create("hc-broken", spec("hc-broken", dataset={"uri": "pvc://data/broken.jsonl"}))
    env.create("hc-run", spec("hc-run", max_steps=4, suspend=True))

    suspended = env.cluster.wait_for(  # past pre-flight, which runs even while suspended
        lambda: o if condition(o := env.get("hc-run"), "Validated").get("status") == "True" and current(o) else None,
        120, "hc-run Suspended after pre-flight")
    assert suspended["status"]["phase"] == "Suspended"
    assert health(suspended) == Health("Suspended", condition(suspended, "Ready")["message"])
    assert "suspend" in health(suspended).message

    env.wait_phase("hc-broken", "Failed", timeout=120)
    broken = env.get("hc-broken")
    assert condition(broken, "Stalled")["status"] == "True"
    assert health(broken) == Health("Degraded", condition(broken, "Stalled")["message"])
    assert "line 2" in health(broken).message

    env.operator.stop()  # resume while nobody watches: the live status describes generation 1 only
    try:
        env.cluster.kube.merge_patch(env.path("hc-run"), {"spec": {"suspend": False}})
        stale = env.get("hc-run")
        assert stale["metadata"]["generation"] == 2 and stale["status"]["observedGeneration"] == 1
        assert health(stale) == Health("Progressing", f"{WAITING} 2")
    finally:
        env.operator.start()

    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        live = env.get("hc-run")
        phase = live["status"].get("phase", "")
        if not seen or seen[-1][0] != phase:
            seen.append((phase, health(live).status))
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(0.2)
    done = env.get("hc-run")
    assert done["status"]["phase"] == "Succeeded", (seen, done["status"].get("message"))
    assert health(done) == Health("Healthy", condition(done, "Ready")["message"])
    before = [verdict for phase, verdict in seen if phase not in ("Succeeded", "Suspended")]
    assert before and set(before) == {"Progressing"}, seen


def _ad_env(cluster: LocalCluster, namespace: str) -> ad.Env:
    base_dir = build_tiny_model(cluster.pvc_dir(namespace, "models") / "tiny")
    for claim in ("data", "adapters"):
        cluster.pvc_dir(namespace, claim)
    return ad.Env(cluster, namespace, base_dir)


def test_adapterdeployment_health_through_its_phases(cluster: LocalCluster, namespace: str,
                                                     operator: OperatorProcess) -> None:
    env = _ad_env(cluster, namespace)
    kube = env.cluster.kube
    broken = ad.adapter_deployment("hc-broken", [])
    broken["spec"]["baseModel"]["uri"] = "s3://models/tiny"  # only pvc://, hf:// and file:// are servable
    try:
        kube.create(f"{ad.GROUP_PATH}/{env.ns}/adapterdeployments", broken)
    except KubeError as e:  # the CRD's own rules may refuse it at the door, which is as good
        assert e.status == 422, e
    else:
        env.wait_phase("hc-broken", "Failed", timeout=60)
        live = kube.get(env.ad_path("hc-broken"))
        assert health(live) == Health("Degraded", condition(live, "Stalled")["message"])

    good = ad.make_uri_adapter(env, "good", seed=4)
    kube.create(f"{ad.GROUP_PATH}/{env.ns}/adapterdeployments",
                ad.adapter_deployment("hc", [{"name": "good", "uri": good}]))
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + ad.READY_TIMEOUT
    while time.monotonic() < deadline:
        live = kube.get(env.ad_path("hc"))
        phase = (live.get("status") or {}).get("phase", "")
        if not seen or seen[-1] != (phase, health(live).status):
            seen.append((phase, health(live).status))
        if phase == "Ready" and current(live):
            break
        time.sleep(0.2)
    assert health(live) == Health("Healthy", condition(live, "Ready")["message"]), seen
    assert [verdict for _, verdict in seen[:-1]] and {verdict for _, verdict in seen[:-1]} == {"Progressing"}, seen

    kube.merge_patch(env.ad_path("hc"), {"spec": {"adapters": [
        {"name": "good", "uri": good}, {"name": "orphan", "loraJobRef": {"name": "no-such-job"}}]}})
    degraded = env.cluster.wait_for(
        lambda: o if current(o := kube.get(env.ad_path("hc"))) and o["status"].get("phase") == "Degraded" else None,
        ad.READY_TIMEOUT, "hc Degraded")
    verdict = health(degraded)
    assert verdict == Health("Degraded", condition(degraded, "Degraded")["message"]) and "orphan" in verdict.message


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "docs" / "argocd.md").read_text(), flags=re.S)


def _sh(command: str, cluster: LocalCluster, stdin: str | None = None) -> str:
    path = f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '')}"
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", command], input=stdin, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": path})
    assert out.returncode == 0, f"{command}\n{out.stdout}{out.stderr}"
    return out.stdout


def test_documented_patches_merge_the_checks_into_argocd_cm(cluster: LocalCluster, namespace: str,
                                                            tmp_path: Path) -> None:
    """Both `kubectl patch` recipes of docs/argocd.md, run as written against a stand-in argocd-cm."""
    cm_path = f"/api/v1/namespaces/{namespace}/configmaps/argocd-cm"
    expected = {key(kind): path.read_text() for kind, path in SCRIPTS.items()}
    commands = [c for c in _doc_blocks("bash") if "patch configmap argocd-cm" in c]
    assert len(commands) == 2, commands
    for_file, for_chart = (c.replace("-n argocd", f"-n {namespace}") for c in commands)

    def fresh_argocd_cm() -> None:
        try:
            cluster.kube.delete(cm_path)
        except KubeError as e:
            assert e.status == 404
        cluster.kube.create(f"/api/v1/namespaces/{namespace}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm"},
            "data": {"url": "https://argocd.example.com"}})

    fresh_argocd_cm()
    [patch] = [b for b in _doc_blocks("yaml") if b.startswith("data:\n")]
    (tmp_path / "kubelora-health.yaml").write_text(patch)
    _sh(f"cd {tmp_path} && {for_file}", cluster)
    assert cluster.kube.get(cm_path)["data"] == {"url": "https://argocd.example.com", **expected}

    fresh_argocd_cm()
    rendered = _sh(f"helm template kubelora {REPO / 'charts' / 'kubelora'} --namespace {namespace} "
                   "--set argocd.healthChecks.enabled=true --show-only templates/argocd-health.yaml", cluster)
    _sh(f"kubectl -n {namespace} apply -f -", cluster, stdin=rendered)
    _sh(for_chart.replace("-n kubelora-system", f"-n {namespace}"), cluster)
    data = cluster.kube.get(cm_path)["data"]
    assert data == {"url": "https://argocd.example.com", **expected}, json.dumps(data)[:500]
    assert yaml.safe_load(rendered)["data"] == expected
