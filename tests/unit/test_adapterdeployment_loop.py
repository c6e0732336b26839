"""The AdapterDeployment supervisor at its boundaries: fake applier, fake status writes, dict indexes.

What a platform team relies on: a refused apply is never reported as applied (observedGeneration holds,
Stalled or Reconciling says why, one Warning Event per distinct problem); an invalid edit keeps the last
valid adapters; no finalizer is ever needed; a Ready object is polled less often.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import kopf
import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentStatus
from kubelora.handlers import adapterdeployment_loop as loop
from kubelora.handlers.adapterdeployment_agents import agent_client
from kubelora.handlers.adapterdeployment_loop import IDLE_SECONDS, Indexes, Supervisor
from kubelora.handlers.kube import ApiError
from kubelora.reconcile.adapterdeployment_views import DeploymentView, PodBlocker, PodView, pod_view

KEY = ("ml", "chat")
ROLLED = DeploymentView(generation=1, observed_generation=1, replicas=1, ready_replicas=1, updated_replicas=1,
                        rollout_complete=True)


def body(generation: int = 1, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u1", "generation": generation},
        "spec": {"baseModel": {"uri": "file:///m", "servedName": "m"}, "engine": "cpu", "replicas": 1,
                 "resources": {"gpus": 0}, "adapters": [{"name": "a", "uri": "file:///a"}], **spec},
        "status": status or {},
    }


class World:
    """The API server as the supervisor sees it: applies (optionally refused), status writes, events."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied: list[str] = []
        self.refuse: ApiError | None = None
        self.writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.deployments: dict[tuple[str, str], list[DeploymentView]] = {}
        self.pods: dict[tuple[str, str], list[PodView]] = {}
        self.now = 0.0
        monkeypatch.setattr(loop, "_post", lambda _b, t, r, m: self.events.append((t, r, m)))
        report = {"pod": "p1", "engineReady": True, "adapters": [{"name": "a", "state": "Loaded"}]}
        self.client = agent_client(httpx.MockTransport(lambda _r: httpx.Response(200, json=report)))
        self.sup = Supervisor(Indexes({}, self.pods, self.deployments), poll_seconds=2.0,
                              image="ghcr.io/kubelora/server:t", pull_policy="Never", apply=self.apply,
                              patch_status=self.patch_status, client=self.client, clock=lambda: self.now)

    async def apply(self, manifest: Mapping[str, Any]) -> None:
        if self.refuse is not None and manifest["kind"] == "Deployment":
            raise self.refuse
        self.applied.append(manifest["kind"])

    async def patch_status(self, _path: str, diff: Mapping[str, Any]) -> None:
        self.writes.append(dict(diff))

    def tick(self, obj: dict[str, Any]) -> AdapterDeploymentStatus:
        self.sup.seen(KEY, obj)
        tracked = self.sup.tracked[KEY]
        return asyncio.run(self.sup.tick(KEY, tracked))

    def conditions(self, status: AdapterDeploymentStatus) -> dict[str, tuple[str, str]]:
        return {c.type: (c.status, c.reason) for c in status.conditions}


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


def ready_status(world: World) -> dict[str, Any]:
    world.deployments[KEY] = [ROLLED]
    world.pods[KEY] = [PodView("p1", "u", "10.0.0.1", "Running", True, False)]
    return world.tick(body()).wire()


@pytest.mark.parametrize(
    ("code", "stalled", "reason"),
    [
        pytest.param(403, "True", "Forbidden", id="rbac"),
        pytest.param(422, "True", "ChildRejected", id="invalid-child"),
        pytest.param(500, "False", "ApiRetrying", id="transient"),
    ],
)
def test_refused_apply_holds_observed_generation_and_says_why(world: World, code: int, stalled: str,
                                                              reason: str) -> None:
    before = ready_status(world)
    assert before["observedGeneration"] == 1
    world.refuse = ApiError(code, f"PATCH /apis/apps/v1/namespaces/ml/deployments/chat: HTTP {code}: no")
    edited = body(generation=2, status=before, replicas=2)
    status = world.tick(edited)
    conds = world.conditions(status)
    assert status.observed_generation == 1, "a generation that was not applied must not be reported as observed"
    assert conds["Ready"] == ("False", reason)
    assert conds["Stalled"] == (stalled, reason)
    assert conds["Reconciling"] == ("False" if stalled == "True" else "True", reason)
    assert f"HTTP {code}" in status.message
    assert [a.name for a in status.adapters] == ["a"], "the adapters served before are still listed"
    # Retries of the same problem post no further Events; a different problem posts one more.
    for _ in range(3):
        world.tick(body(generation=2, status=status.wire(), replicas=2))
    warnings = [e for e in world.events if e[0] == "Warning"]
    if stalled == "True":
        assert [(r, "HTTP" in m) for _, r, m in warnings] == [(reason, True)]
    world.refuse = None
    fixed = world.tick(body(generation=2, status=status.wire(), replicas=2))
    assert fixed.observed_generation == 2
    assert "Deployment" in world.applied


def test_persistent_refusal_retries_slowly(world: World) -> None:
    world.refuse = ApiError(403, "forbidden")
    world.tick(body())
    assert world.sup.tracked[KEY].interval == loop.REFUSED_SECONDS


def test_invalid_edit_keeps_the_served_adapters_and_applies_nothing(world: World) -> None:
    before = ready_status(world)
    world.applied.clear()
    dup = [{"name": "a", "uri": "file:///a"}, {"name": "a", "uri": "file:///b"}]
    status = world.tick(body(generation=2, status=before, adapters=dup))
    conds = world.conditions(status)
    assert world.applied == [], "nothing is applied, so nothing is unloaded"
    assert conds["Stalled"] == ("True", "InvalidSpec") and conds["Ready"] == ("False", "InvalidSpec")
    assert status.observed_generation == 2, "judged: kstatus reads Failed, not InProgress"
    assert [(a.name, a.state) for a in status.adapters] == [("a", "Loaded")]
    assert status.replicas == 1 and status.phase == "Degraded"
    assert "listed twice" in status.message


def test_pod_blockers_surface_in_message(world: World) -> None:
    world.deployments[KEY] = [DeploymentView(generation=1, observed_generation=1, replicas=1)]
    pull = PodBlocker("ImagePullBackOff", 'Back-off pulling image "x"', stalled=True)
    world.pods[KEY] = [PodView("p1", "u", None, "Pending", False, False, blocker=pull)]
    status = world.tick(body())
    assert world.conditions(status)["Stalled"] == ("True", "PodBlocked")
    assert "ImagePullBackOff" in status.message and status.phase == "Failed"


def test_unschedulable_is_reconciling_then_stalled() -> None:
    raw = {"metadata": {"name": "p1", "uid": "u"},
           "status": {"phase": "Pending", "conditions": [{
               "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
               "lastTransitionTime": "2026-01-01T00:00:00Z",
               "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}}
    from kubelora.reconcile.adapterdeployment_status import Observed, aggregate_status

    obs = Observed(generation=1, desired_replicas=1, endpoint="e", desired_adapters=0,
                   deployment=DeploymentView(generation=1, observed_generation=1), pods=[pod_view(raw)])
    early = aggregate_status(obs, None, "2026-01-01T00:00:10Z")
    late = aggregate_status(obs, None, "2026-01-01T00:05:00Z")
    cond = {c.type: (c.status, c.reason) for c in early.conditions}
    assert cond["Reconciling"] == ("True", "Unschedulable") and cond["Stalled"][0] == "False"
    cond = {c.type: (c.status, c.reason) for c in late.conditions}
    assert cond["Stalled"] == ("True", "Unschedulable") and cond["Ready"][0] == "False"
    assert "Insufficient nvidia.com/gpu" in late.message


def test_replica_failure_is_stalled() -> None:
    from kubelora.reconcile.adapterdeployment_status import Observed, aggregate_status
    from kubelora.reconcile.adapterdeployment_views import deployment_view

    dep = deployment_view({"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": 'pods "chat-1" is forbidden: exceeded quota: gpu'}]}})
    status = aggregate_status(Observed(generation=1, desired_replicas=1, endpoint="e", desired_adapters=0,
                                       deployment=dep), None, "2026-01-01T00:00:00Z")
    assert {c.type: c.reason for c in status.conditions if c.status == "True"}["Stalled"] == "ReplicaFailure"
    assert "exceeded quota" in status.message


def test_ready_objects_back_off_and_events_bring_them_forward(world: World) -> None:
    status = ready_status(world)
    assert world.conditions(AdapterDeploymentStatus.model_validate(status))["Ready"][0] == "True"
    tracked = world.sup.tracked[KEY]
    tracked.body["status"] = status
    for _ in range(8):
        asyncio.run(world.sup.tick(KEY, tracked))
    assert tracked.interval == IDLE_SECONDS
    world.sup.kick(KEY)
    assert (tracked.interval, tracked.due) == (2.0, 0.0)


def test_status_writes_only_on_change(world: World) -> None:
    ready_status(world)
    writes = len(world.writes)
    tracked = world.sup.tracked[KEY]
    asyncio.run(world.sup.tick(KEY, tracked))
    assert len(world.writes) == writes


def test_status_carries_the_scale_selector(world: World) -> None:
    status = ready_status(world)
    assert status["selector"] == "app.kubernetes.io/component=server,kubelora.io/adapterdeployment=chat"


def test_no_handler_makes_kopf_add_a_finalizer() -> None:
    """kopf adds its finalizer for timers, daemons and non-optional deletion handlers; we register none."""
    import kubelora.handlers  # noqa: F401  (registers every handler)

    registry = kopf.get_default_registry()
    assert registry._spawning.get_all_handlers() == [], "a timer or daemon would put a finalizer on every object"
    changing = [h for h in registry._changing.get_all_handlers() if getattr(h, "reason", None) == "delete"]
    assert changing == []
