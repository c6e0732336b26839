"""Every manifest in examples/ and the Helm chart is accepted by a real API server (server-side dry run).

The CPU quickstart is also applied for real by `make demo` and the LoRAJob/AdapterDeployment e2e tests;
the GPU examples and the chart cannot run here, but the API server still validates them against the
installed CRDs and the built-in schemas.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import LocalCluster

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def kubectl(cluster: LocalCluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert (BIN / "kubectl").exists(), "kubectl is missing: run `make venv`"
    return subprocess.run(
        [str(BIN / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO))) for p in EXAMPLES])
def test_example_is_accepted(cluster: LocalCluster, namespace: str, path: Path) -> None:
    kubectl(cluster, "create", "namespace", "ml")  # the GPU examples name it; AlreadyExists is fine
    target = [] if "namespace:" in path.read_text() else ["-n", namespace]
    result = kubectl(cluster, "apply", "--dry-run=server", *target, "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout


def test_bad_example_is_rejected_by_the_crd_schema(cluster: LocalCluster, namespace: str) -> None:
    bad = (REPO / "examples" / "cpu-quickstart" / "lorajob.yaml").read_text().replace("r: 8,", "r: 0,")
    result = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=bad)
    assert result.returncode != 0
    assert "spec.lora.r" in result.stderr and "should be greater than or equal to 1" in result.stderr


def test_chart_renders_manifests_the_api_server_accepts(cluster: LocalCluster, namespace: str) -> None:
    rendered = subprocess.run(
        [
            str(BIN / "helm"),
            "template",
            "kl",
            str(REPO / "charts" / "kubelora"),
            "--namespace",
            namespace,
            "--set",
            f"watchNamespaces={{{namespace}}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=rendered)
    assert result.returncode == 0, result.stderr
    for kind in (
        "serviceaccount",
        "clusterrole.rbac.authorization.k8s.io",
        "rolebinding.rbac.authorization.k8s.io",
        "deployment.apps",
    ):
        assert kind in result.stdout
