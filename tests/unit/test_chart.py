"""The Helm chart renders, lints, and grants only what the operator needs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".venv" / "bin" / "helm"
CHART = REPO / "charts" / "kubelora"


def helm(*args: str) -> str:
    assert HELM.exists(), "helm is missing: run `make venv` (hack/install-kube-tools.sh installs it)"
    return subprocess.run([str(HELM), *args], check=True, capture_output=True, text=True).stdout


def render(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "kl", str(CHART), "--namespace", "kubelora-system"]
    for item in sets:
        args += ["--set", item]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


def test_lint() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART))


def test_operator_runs_non_root_with_read_only_root() -> None:
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "--all-namespaces" in container["args"]


def test_rbac_is_least_privilege() -> None:
    for role in (d for d in render() if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "secrets" not in rule["resources"], "the operator must never read Secrets"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_namespaced_install_binds_per_namespace() -> None:
    docs = render("watchNamespaces={ml,research}")
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == ["kl-operator-discovery"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=ml", "--namespace=research"]


def test_chart_ships_the_generated_crds() -> None:
    names = sorted(p.name for p in (CHART / "crds").glob("kubelora.io_*.yaml"))
    assert names == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert (CHART / "crds" / "kopf.dev_peerings.yaml").exists(), "HA needs kopf's peering CRDs"


@pytest.mark.parametrize("values", [pytest.param(("peering.enabled=true", "replicas=2"), id="ha")])
def test_ha_uses_peering(values: tuple[str, ...]) -> None:
    docs = render(*values)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "--peering=kubelora" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterKopfPeering"] == ["kubelora"]


def test_no_admission_webhook_is_installed() -> None:
    """CEL rules in the CRDs replace the webhook: nothing cluster-wide to leave behind on uninstall."""
    docs = render()
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
    assert not [d for d in docs if d["kind"] == "Service" and "webhook" in d["metadata"]["name"]]
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    assert not [r for r in rules if "admissionregistration.k8s.io" in r["apiGroups"]]
