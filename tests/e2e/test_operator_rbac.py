"""The API server, asked with the chart's ServiceAccount token (SelfSubjectAccessReview), allows the operator
exactly what its code needs (computed in tests/unit/test_rbac.py from the requests the reconcilers make and
kopf's machinery) and nothing else on the same resources, nor on Secrets, Pods' exec or RBAC. The session
operator runs with this token too (``chart_identity``), so every e2e test is also a test of this RBAC."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora_local.kube import Credentials, Kube

from ..unit.test_rbac import Need, code_needs
from .conftest import LocalCluster
from .operator_fixture import ChartIdentity

pytestmark = pytest.mark.e2e
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}
NEVER = [("", "secrets", "get"), ("", "secrets", "list"), ("", "pods/exec", "create"), ("", "nodes", "get"),
         ("rbac.authorization.k8s.io", "clusterroles", "create"),
         ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
         ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create"),
         ("kubelora.io", "lorajobs", "delete"), ("kubelora.io", "adapterdeployments", "update")]


def may(kube: Kube, group: str, resource: str, verb: str, name: str = "") -> bool:
    plural, _, sub = resource.partition("/")
    attributes: dict[str, Any] = {"group": group, "resource": plural, "subresource": sub, "verb": verb,
                                  "name": name}
    if plural not in CLUSTER_SCOPED:
        attributes["namespace"] = "ml"
    review = kube.create("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes}})
    return bool(review["status"]["allowed"])


@pytest.fixture(scope="module")
def as_operator(cluster: LocalCluster, chart_identity: ChartIdentity) -> Kube:
    return Kube(Credentials(cluster.info.server, chart_identity.token, cluster.info.ca_file))


@pytest.fixture(scope="module")
def needs() -> set[Need]:
    return code_needs(namespaced=False, peering=False)  # the chart's defaults: cluster-wide, one replica


def test_the_token_is_the_chart_service_account(as_operator: Kube, chart_identity: ChartIdentity) -> None:
    review = as_operator.create("/apis/authentication.k8s.io/v1/selfsubjectreviews", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == chart_identity.service_account


def test_everything_the_code_needs_is_allowed(as_operator: Kube, needs: set[Need]) -> None:
    refused = sorted((g, r, v, name) for g, r, v, names in needs for name in names or ("",)
                     if not may(as_operator, g, r, v, name))
    assert not refused, f"the API server refuses the operator: {refused}"


def test_nothing_else_on_those_resources(as_operator: Kube, needs: set[Need]) -> None:
    needed = {(g, r, v) for g, r, v, _ in needs}
    extra = sorted((g, r, v) for g, r in {(g, r) for g, r, _ in needed} for v in VERBS
                   if (g, r, v) not in needed and may(as_operator, g, r, v))
    assert not extra, f"allowed although no code uses it: {extra}"
    by_name = [(g, r, v, names) for g, r, v, names in needs if names]
    assert not [n for n in by_name if may(as_operator, n[0], n[1], n[2], "someone-else")], "resourceNames ignored"


@pytest.mark.parametrize(("group", "resource", "verb"), NEVER, ids=[f"{r}-{v}" for _, r, v in NEVER])
def test_never(as_operator: Kube, group: str, resource: str, verb: str) -> None:
    assert not may(as_operator, group, resource, verb)
