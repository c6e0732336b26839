"""Handler helpers at their boundaries: agent polling over a mock transport, change-only applies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.meta import ObjectRef
from kubelora.handlers.adapterdeployment_agents import agent_client, agent_url, poll_agents
from kubelora.handlers.adapterdeployment_children import apply_children, build_children, changed
from kubelora.handlers.kube import manifest_path
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.reconcile.adapterdeployment_views import PodView

DIGEST = "sha256:" + "a" * 64


def pod(name: str, ip: str | None = "127.0.0.9", phase: str = "Running", terminating: bool = False) -> PodView:
    return PodView(name=name, uid=f"uid-{name}", ip=ip, phase=phase, ready=True, terminating=terminating)


def agent_transport(answers: dict[str, Any]) -> httpx.MockTransport:
    """Fakes each pod's agent: host -> JSON body (dict), HTTP status (int) or an exception."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.port == 8081 and request.url.path == "/adapters"
        answer = answers[request.url.host]  # httpx gives an IPv6 host without its brackets
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, int):
            return httpx.Response(answer)
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


def test_poll_agents_reads_reports_and_tolerates_bad_agents() -> None:
    report = {
        "pod": "a",
        "engineReady": True,
        "generation": "7",
        "adapters": [{"name": "support", "state": "Loaded", "digest": DIGEST}],
    }
    answers = {
        "127.0.0.2": report,
        "127.0.0.3": 503,
        "127.0.0.4": httpx.ConnectError("refused"),
        "127.0.0.5": {"unexpected": True},
    }
    pods = [
        pod("a", "127.0.0.2"),
        pod("b", "127.0.0.3"),
        pod("c", "127.0.0.4"),
        pod("d", "127.0.0.5"),
        pod("pending", None, phase="Pending"),
        pod("leaving", "127.0.0.6", terminating=True),
    ]
    reports = asyncio.run(poll(pods, agent_transport(answers)))
    assert [r.pod for r in reports] == ["a", "b", "c", "d"]
    assert reports[0].report is not None and reports[0].report.adapters[0].state == "Loaded"
    assert all(r.report is None and r.error for r in reports[1:])


async def poll(pods: list[PodView], transport: httpx.MockTransport) -> list[Any]:
    async with agent_client(transport) as client:
        return await poll_agents(pods, client)


def test_poll_agents_with_no_pods_makes_no_requests() -> None:
    assert asyncio.run(poll([], agent_transport({}))) == []


@pytest.mark.parametrize(
    ("ip", "url"),
    [
        pytest.param("10.244.0.7", "http://10.244.0.7:8081/adapters", id="ipv4"),
        pytest.param("fd00::1", "http://[fd00::1]:8081/adapters", id="ipv6"),
        pytest.param("fd00:10:244::a", "http://[fd00:10:244::a]:8081/adapters", id="ipv6-long"),
    ],
)
def test_agent_url_brackets_ipv6(ip: str, url: str) -> None:
    assert agent_url(ip) == url
    assert str(httpx.URL(url)) == url


def test_ipv6_agents_are_polled_and_bad_addresses_reported_not_raised() -> None:
    report = {"pod": "a", "engineReady": True, "adapters": []}
    pods = [pod("v6", "fd00::1"), pod("zone", "fe80::1%eth0"), pod("junk", "not an ip:::[")]
    answers = {"fd00::1": report, "fe80::1%eth0": httpx.ConnectError("no route")}
    reports = asyncio.run(poll(pods, agent_transport(answers)))
    by_pod = {r.pod: r for r in reports}
    assert by_pod["v6"].report is not None and by_pod["v6"].report.engine_ready
    assert by_pod["junk"].report is None and by_pod["junk"].error
    assert by_pod["zone"].report is None and by_pod["zone"].error


def ad_body() -> dict[str, Any]:
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {
            "name": "support",
            "namespace": "ml",
            "uid": "uid-1",
            "labels": {"team": "a", "app.kubernetes.io/instance": "argo-app"},
        },
        "spec": {"baseModel": {"uri": "file:///m", "servedName": "m"}, "engine": "cpu"},
    }


def children(*resolved: ResolvedAdapter) -> list[dict[str, Any]]:
    body = ad_body()
    spec = AdapterDeploymentSpec.model_validate(body["spec"])
    return build_children(ObjectRef.of(body), spec, list(resolved), image="ghcr.io/kubelora/server:t",
                          pull_policy="Never")


def test_children_are_owned_in_dependency_order_with_our_labels_only() -> None:
    kids = children()
    assert [k["kind"] for k in kids] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ]
    for kid in kids:
        assert kid["metadata"]["namespace"] == "ml"
        assert [(o["uid"], o["controller"]) for o in kid["metadata"]["ownerReferences"]] == [("uid-1", True)]
        labels = kid["metadata"]["labels"]
        # The instance label is ours; the owner's labels (Argo CD's tracking label above all) are not copied.
        assert labels["kubelora.io/adapterdeployment"] == "support"
        assert labels["app.kubernetes.io/managed-by"] == "kubelora-operator"
        assert "team" not in labels and "app.kubernetes.io/instance" not in labels
    [deployment] = [k for k in kids if k["kind"] == "Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/managed-by"] == "kubelora-operator"  # the shared Pod watch selector
    assert "app.kubernetes.io/instance" not in pod_labels and "team" not in pod_labels


def test_pdb_allows_one_disruption_of_the_serving_pods() -> None:
    kids = {k["kind"]: k for k in children()}
    pdb, deployment = kids["PodDisruptionBudget"], kids["Deployment"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}


def test_only_changed_children_are_applied_again() -> None:
    memo: dict[str, Any] = {}
    sent: list[str] = []

    async def record(manifest: dict[str, Any]) -> None:
        sent.append(manifest["kind"])

    asyncio.run(apply_children(children(), memo, record))
    assert len(sent) == 7
    assert changed(children(), memo) == []
    new = children(ResolvedAdapter("legal", uri="s3://b/legal", digest=DIGEST))
    todo = changed(new, memo)
    assert [k["kind"] for k in todo] == ["ConfigMap"]  # an adapter change never touches the Deployment
    data = json.loads(todo[0]["data"]["adapters.json"])
    assert data["adapters"] == [{"name": "legal", "uri": "s3://b/legal", "digest": DIGEST}]


def test_failed_apply_is_retried_next_time() -> None:
    memo: dict[str, Any] = {}

    async def refuse_deployments(manifest: dict[str, Any]) -> None:
        if manifest["kind"] == "Deployment":
            raise RuntimeError("forbidden")

    with pytest.raises(RuntimeError):
        asyncio.run(apply_children(children(), memo, refuse_deployments))
    assert [k["kind"] for k in changed(children(), memo)] == ["Deployment", "Service", "PodDisruptionBudget"]


@pytest.mark.parametrize(
    ("manifest", "path"),
    [
        pytest.param(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}},
            "/api/v1/namespaces/n/configmaps/c",
            id="core",
        ),
        pytest.param(
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"}},
            "/apis/apps/v1/namespaces/n/deployments/d",
            id="apps",
        ),
        pytest.param(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "r", "namespace": "n"},
            },
            "/apis/rbac.authorization.k8s.io/v1/namespaces/n/rolebindings/r",
            id="rbac",
        ),
    ],
)
def test_object_path(manifest: dict[str, Any], path: str) -> None:
    assert manifest_path(manifest) == path
