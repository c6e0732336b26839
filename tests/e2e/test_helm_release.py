"""The Helm chart on the real local cluster: `helm install` runs the operator as a pod under the chart's own
ServiceAccount and RBAC (no admin token), it trains a LoRAJob to Succeeded, and `helm uninstall` leaves only
the CRDs: no cluster-scoped leftovers and nothing (webhook, finalizer) that blocks creating, changing or
deleting either kind afterwards."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kubelora_local.kube import KubeError

from ..unit.test_rbac import code_needs
from .conftest import LocalCluster
from .operator_fixture import OperatorProcess
from .test_lorajob import GROUP_PATH, make_env, spec

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".venv" / "bin" / "helm"
CHART = REPO / "charts" / "kubelora"
Obj = dict[str, Any]
CLUSTER_SCOPED = (
    "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
    "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
)


def helm(cluster: LocalCluster, *args: str) -> str:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "HELM_CACHE_HOME": str(cluster.state_dir / "helm")}
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def names(cluster: LocalCluster, path: str) -> set[str]:
    return {o["metadata"]["name"] for o in cluster.kube.get(path)["items"]}


def cluster_scoped(cluster: LocalCluster) -> set[str]:
    return {f"{path.rsplit('/', 1)[1]}/{name}" for path in CLUSTER_SCOPED for name in names(cluster, path)}


def operator_pods(cluster: LocalCluster, ns: str) -> list[Obj]:
    pods: list[Obj] = cluster.kube.get(
        f"/api/v1/namespaces/{ns}/pods", labelSelector="app.kubernetes.io/name=kubelora"
    )["items"]
    return pods


def test_helm_install_trains_and_uninstall_leaves_only_crds(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess
) -> None:
    operator.stop()  # the session's operator would reconcile this namespace too
    try:
        env = make_env(cluster, namespace, operator)
        before = cluster_scoped(cluster)
        crds = names(cluster, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        helm(cluster, "install", "kl", str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s")
        installed = cluster_scoped(cluster) - before
        assert installed and all("kl-operator" in n for n in installed), installed
        [pod] = operator_pods(cluster, namespace)
        assert pod["spec"]["serviceAccountName"] == "kl-operator"
        check_operator_access(cluster, namespace)
        upgrade_crds(cluster)
        try:
            out = helm(cluster, "test", "kl", "--namespace", namespace, "--timeout", "120s")
        except BaseException:
            print(cluster.logs(namespace, "kl-operator-test", "check")[-4000:])
            raise
        assert "kl-operator-test" in out and "Succeeded" in out, out

        env.create("charted", spec("charted", max_steps=5))
        try:
            status = env.wait_phase("charted", "Succeeded", timeout=240)
        except BaseException:
            print(cluster.logs(namespace, operator_pods(cluster, namespace)[0]["metadata"]["name"], "operator")[-6000:])
            raise
        assert status["adapter"]["digest"].startswith("sha256:")

        helm(cluster, "uninstall", "kl", "--namespace", namespace, "--wait", "--timeout", "60s")
        cluster.wait_for(lambda: not operator_pods(cluster, namespace), 60, "operator pod gone")
        assert cluster_scoped(cluster) == before  # nothing cluster-scoped left behind
        # CRDs stay (Helm never deletes them): ours, plus kopf's peering CRDs if the chart installed them.
        after = names(cluster, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        added = after - crds
        assert crds <= after
        assert added <= {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}, added

        # With no operator at all, both kinds can still be created, changed and deleted at once.
        job = env.path("charted")
        cluster.kube.merge_patch(job, {"metadata": {"labels": {"touched": "yes"}}})
        ad_path = f"{GROUP_PATH}/{namespace}/adapterdeployments"
        ad = {"apiVersion": "kubelora.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "after"},
              "spec": {"baseModel": {"uri": "pvc://models/tiny", "servedName": "tiny"},
                       "adapters": [{"name": "a", "uri": "pvc://adapters/charted"}]}}
        cluster.kube.create(ad_path, ad)
        env.create("later", spec("later"))
        for path in (job, f"{ad_path}/after", env.path("later")):
            assert not cluster.kube.get(path)["metadata"].get("finalizers"), path
            cluster.kube.delete(path)
        deadline = time.monotonic() + 20
        for path in (job, f"{ad_path}/after", env.path("later")):
            left = max(1.0, deadline - time.monotonic())
            cluster.wait_for(lambda p=path: not exists(cluster, p), left, f"{path} gone")
    finally:
        operator.start()


# What the operator must never be able to do: (namespace or None, group, resource, subresource, verb).
FORBIDDEN = (
    ("", "", "secrets", "", "get"),
    ("", "", "secrets", "", "list"),
    ("", "", "pods", "exec", "create"),
    ("", "", "pods", "", "delete"),
    ("", "", "configmaps", "", "delete"),
    ("kube-system", "apps", "deployments", "", "delete"),
    ("kube-system", "", "secrets", "", "get"),
    ("", "kubelora.io", "lorajobs", "", "delete"),
    ("", "kubelora.io", "lorajobs", "", "update"),
    ("", "kubelora.io", "adapterdeployments", "", "patch"),
    ("", "rbac.authorization.k8s.io", "roles", "", "escalate"),
    ("", "rbac.authorization.k8s.io", "roles", "", "bind"),
    (None, "rbac.authorization.k8s.io", "clusterroles", "", "create"),
    (None, "apiextensions.k8s.io", "customresourcedefinitions", "", "create"),
    (None, "", "namespaces", "", "list"),  # cluster-wide kopf never lists namespaces
    (None, "", "nodes", "", "list"),
    (None, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "", "patch"),
)
CLUSTER_SCOPED_RESOURCES = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


def allowed(cluster: LocalCluster, namespace: str, attrs: dict[str, str]) -> bool:
    """The API server's own RBAC answer for the chart's ServiceAccount (a SubjectAccessReview)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": f"system:serviceaccount:{namespace}:kl-operator",
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
        "resourceAttributes": attrs}}
    answer = cluster.kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return bool(answer["status"].get("allowed"))


def check_operator_access(cluster: LocalCluster, namespace: str) -> None:
    """Everything the code needs (the unit test's computed set) is allowed; a sample of the rest is denied."""
    needs = code_needs(namespaced=False, peering=False)
    assert len(needs) > 30
    refused = []
    for group, resource, verb, names in sorted(needs):
        plural, _, sub = resource.partition("/")
        attrs = {"group": group, "resource": plural, "subresource": sub, "verb": verb, "name": "any",
                 **({} if plural in CLUSTER_SCOPED_RESOURCES else {"namespace": namespace})}
        for name in names or ("",):
            if not allowed(cluster, namespace, {**attrs, "name": name}):
                refused.append((group, resource, verb, name))
    assert not refused, f"the chart's ServiceAccount lacks what the operator needs: {refused}"
    granted = [f for f in FORBIDDEN if allowed(cluster, namespace, {
        "group": f[1], "resource": f[2], "subresource": f[3], "verb": f[4],
        **({"namespace": f[0] or namespace} if f[0] is not None else {})})]
    assert not granted, f"the chart's ServiceAccount may do what the operator must not: {granted}"


def upgrade_crds(cluster: LocalCluster) -> None:
    """The CRD upgrade docs/helm.md gives (Helm never upgrades crds/), against CRDs Helm installed."""
    kubectl = REPO / ".venv" / "bin" / "kubectl"
    done = subprocess.run([str(kubectl), "--kubeconfig", str(cluster.kubeconfig), "apply", "--server-side",
                           "--force-conflicts", "-f", str(CHART / "crds")], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "lorajobs.kubelora.io serverside-applied" in done.stdout, done.stdout


def exists(cluster: LocalCluster, path: str) -> bool:
    try:
        cluster.kube.get(path)
    except KubeError as e:
        if e.status == 404:
            return False
        raise
    return True



def test_ha_release_has_one_active_operator_that_trains(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess
) -> None:
    """replicas=2 with peering: both pods Ready, two live peers with distinct priorities (kopf pauses on equal
    ones, which left no replica active), and the active one trains a LoRAJob."""
    operator.stop()
    try:
        env = make_env(cluster, namespace, operator)
        helm(cluster, "install", "ha", str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
             "--set", "replicas=2", "--set", "peering.enabled=true", "--set", f"watchNamespaces={{{namespace}}}")
        try:
            pods = [p for p in operator_pods(cluster, namespace) if p["metadata"]["labels"].get(
                "app.kubernetes.io/component") == "operator"]
            assert len(pods) == 2 and all(
                c["ready"] for p in pods for c in p["status"]["containerStatuses"]), pods
            peering = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/kubelora"
            peers = cluster.wait_for(lambda: len(cluster.kube.get(peering).get("status") or {}) == 2
                                     and cluster.kube.get(peering)["status"], 60, "two live peers")
            priorities = [p["priority"] for p in peers.values()]
            assert len(set(priorities)) == 2 and min(priorities) > 0, peers

            env.create("ha", spec("ha", max_steps=3))
            try:
                env.wait_phase("ha", "Succeeded", timeout=240)
            except BaseException:
                for p in pods:
                    print(cluster.logs(namespace, p["metadata"]["name"], "operator")[-3000:])
                raise
        finally:
            helm(cluster, "uninstall", "ha", "--namespace", namespace, "--wait", "--timeout", "60s")
    finally:
        operator.start()
