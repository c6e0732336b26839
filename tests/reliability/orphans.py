"""What a namespace still holds of KubeLoRA's objects: the LoRAJobs and AdapterDeployments and every kind of child
the operator creates (and the Pods that Jobs and Deployments make). Shared by the reliability test and
bench/operator_scale.py ``--delete-at-once``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubelora_local.kube import Kube

KINDS = {
    "LoRAJob": "/apis/kubelora.io/v1alpha1/namespaces/{ns}/lorajobs",
    "AdapterDeployment": "/apis/kubelora.io/v1alpha1/namespaces/{ns}/adapterdeployments",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
}
NAMESPACE_DEFAULTS = {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}
"""What every namespace has: not KubeLoRA's."""


def left(kube: Kube, ns: str) -> dict[str, int]:
    """Count per kind of what remains (kinds with none left out)."""
    counts: dict[str, int] = {}
    for kind, path in KINDS.items():
        items: list[dict[str, Any]] = kube.get(path.format(ns=ns))["items"]
        n = sum(1 for i in items if (kind, i["metadata"]["name"]) not in NAMESPACE_DEFAULTS)
        if n:
            counts[kind] = n
    return counts


def create_lorajobs(kube: Kube, ns: str, bodies: list[dict[str, Any]], threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda body: kube.create(KINDS["LoRAJob"].format(ns=ns), body), bodies))


def delete_all_lorajobs(kube: Kube, ns: str) -> None:
    """One DELETE of the collection, as ``kubectl delete lorajobs --all`` sends; background propagation."""
    kube.request("DELETE", KINDS["LoRAJob"].format(ns=ns),
                 {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"})
