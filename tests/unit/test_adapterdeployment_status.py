"""Status aggregation: Deployment status + agents' reports -> phase, conditions and per-adapter states."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentStatus
from kubelora.api.runtime import AgentAdapterState, AgentReport
from kubelora.reconcile.adapterdeployment_adapters import aggregate_adapter
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.reconcile.adapterdeployment_spec import parse_spec, status_patch
from kubelora.reconcile.adapterdeployment_status import Observed, aggregate_status
from kubelora.reconcile.adapterdeployment_views import DeploymentView, ReplicaReport, deployment_view, pod_view

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SUPPORT = ResolvedAdapter("support", uri="pvc://adapters/s/rev-1", digest=D1)
LEGAL = ResolvedAdapter("legal", uri="s3://b/legal")


def agent(
    pod: str,
    *states: tuple[str, str],
    digest: str | None = D1,
    engine_ready: bool = True,
    ready: bool = True,
    reason: str = "",
    message: str = "",
) -> ReplicaReport:
    adapters = [
        AgentAdapterState.model_validate(
            {
                "name": n,
                "state": s,
                "digest": digest,
                "reason": reason if s == "Failed" else "",
                "message": message if s == "Failed" else "",
            }
        )
        for n, s in states
    ]
    report = AgentReport(pod=pod, engine_ready=engine_ready, adapters=adapters)
    return ReplicaReport(pod=pod, ready=ready, report=report)


def silent(pod: str) -> ReplicaReport:
    return ReplicaReport(pod=pod, ready=False, error="ConnectError")


@pytest.mark.parametrize(
    ("adapter", "replicas", "state", "loaded", "reason", "message"),
    [
        pytest.param(
            SUPPORT,
            [agent("p1", ("support", "Loaded")), agent("p2", ("support", "Loaded"))],
            "Loaded",
            2,
            "",
            "",
            id="loaded-everywhere",
        ),
        pytest.param(
            SUPPORT,
            [agent("p1", ("support", "Loaded")), agent("p2", ("support", "Loading"))],
            "Loading",
            1,
            "",
            "",
            id="loading-on-one",
        ),
        pytest.param(
            SUPPORT,
            [agent("p1", ("support", "Downloading")), agent("p2", ("support", "Loading"))],
            "Downloading",
            0,
            "",
            "",
            id="least-advanced-wins",
        ),
        pytest.param(
            SUPPORT,
            [agent(p, ("support", "Failed"), reason="DigestMismatch", message="bad") for p in ("p1", "p2")],
            "Failed",
            0,
            "DigestMismatch",
            "bad",
            id="failed-everywhere",
        ),
        pytest.param(
            SUPPORT,
            [
                agent("p1", ("support", "Loaded")),
                agent("p2", ("support", "Failed"), reason="LoadFailed", message="oom"),
            ],
            "Failed",
            1,
            "LoadFailed",
            "p2: oom",
            id="failed-on-one",
        ),
        pytest.param(SUPPORT, [agent("p1")], "Pending", 0, "", "", id="agent-has-not-seen-it"),
        pytest.param(
            SUPPORT,
            [agent("p1", ("support", "Loaded"), digest=D2)],
            "Pending",
            0,
            "",
            "waiting for the new digest",
            id="stale-digest",
        ),
        pytest.param(
            LEGAL, [agent("p1", ("legal", "Loaded"), digest=D2)], "Loaded", 1, "", "", id="unpinned-any-digest"
        ),
        pytest.param(SUPPORT, [silent("p1")], "Pending", 0, "", "waiting for a replica to report", id="no-reports"),
        pytest.param(
            SUPPORT,
            [agent("p1", ("support", "Loaded")), silent("p2")],
            "Loaded",
            1,
            "",
            "",
            id="silent-replica-ignored",
        ),
        pytest.param(
            ResolvedAdapter("x", verdict="Failed", reason="LoRAJobNotFound", message="gone"),
            [agent("p1", ("x", "Loaded"))],
            "Failed",
            0,
            "LoRAJobNotFound",
            "gone",
            id="operator-verdict",
        ),
    ],
)
def test_adapter_state(
    adapter: ResolvedAdapter, replicas: list[ReplicaReport], state: str, loaded: int, reason: str, message: str
) -> None:
    status = aggregate_adapter(adapter, replicas, None, T0)
    assert (status.state, status.loaded_replicas, status.reason, status.message) == (state, loaded, reason, message)
    assert status.last_transition_time == T0


ROLLED = DeploymentView(
    generation=2, observed_generation=2, replicas=2, ready_replicas=2, updated_replicas=2, rollout_complete=True
)


def observed(**kw: Any) -> Observed:
    base: dict[str, Any] = {
        "generation": 4,
        "desired_replicas": 2,
        "endpoint": "http://s.ml.svc:8000/v1",
        "desired_adapters": 1,
        "resolved": [SUPPORT],
        "deployment": ROLLED,
        "replicas": [agent("p1", ("support", "Loaded")), agent("p2", ("support", "Loaded"))],
    }
    return Observed(**{**base, **kw})


def roll(**kw: Any) -> DeploymentView:
    fields = {**ROLLED.__dict__, **kw}
    return DeploymentView(**fields)


@pytest.mark.parametrize(
    ("obs", "phase", "ready", "progressing", "degraded"),
    [
        pytest.param(
            observed(), "Ready", ("True", "AllReady"), ("False", "AllReady"), ("False", "AllReady"), id="all-ready"
        ),
        pytest.param(
            observed(deployment=None, replicas=[]),
            "Pending",
            ("False", "ReplicasUnavailable"),
            ("True", "ReplicasUnavailable"),
            ("False", "ReplicasUnavailable"),
            id="no-deployment-yet",
        ),
        pytest.param(
            observed(
                resolved=[SUPPORT, ResolvedAdapter("gone", verdict="Failed", reason="LoRAJobNotFound")],
                desired_adapters=2,
            ),
            "Degraded",
            ("True", "AllReady"),
            ("False", "AllReady"),
            ("True", "AdaptersFailed"),
            id="failed-adapter-others-served",
        ),
        pytest.param(
            observed(deployment=roll(ready_replicas=1, rollout_complete=False)),
            "Progressing",
            ("False", "ReplicasUnavailable"),
            ("True", "ReplicasUnavailable"),
            ("False", "ReplicasUnavailable"),
            id="rolling-out",
        ),
        pytest.param(
            observed(deployment=roll(ready_replicas=1), replicas=[agent("p1", ("support", "Loaded"))]),
            "Degraded",
            ("False", "ReplicasUnavailable"),
            ("True", "ReplicasUnavailable"),
            ("True", "ReplicasUnavailable"),
            id="replica-lost-after-rollout",
        ),
        pytest.param(
            observed(deployment=roll(ready_replicas=0), replicas=[agent("p1", ("support", "Loading"), ready=False)]),
            "Progressing",
            ("False", "AdaptersPending"),
            ("True", "AdaptersPending"),
            ("False", "AdaptersPending"),
            id="engine-up-adapter-loading",
        ),
        pytest.param(
            observed(
                deployment=roll(
                    ready_replicas=0,
                    rollout_complete=False,
                    deadline_exceeded=True,
                    message="ReplicaSet has timed out progressing.",
                ),
                replicas=[],
            ),
            "Failed",
            ("False", "ReplicasUnavailable"),
            ("False", "ReplicasUnavailable"),
            ("False", "ReplicasUnavailable"),
            id="progress-deadline",
        ),
        pytest.param(
            observed(invalid="invalid spec: x", deployment=None, replicas=[]),
            "Failed",
            ("False", "InvalidSpec"),
            ("False", "InvalidSpec"),
            ("False", "InvalidSpec"),
            id="invalid-spec",
        ),
        pytest.param(
            observed(invalid="invalid spec: x", replicas=[]),
            "Degraded",
            ("False", "InvalidSpec"),
            ("False", "InvalidSpec"),
            ("True", "InvalidSpec"),
            id="invalid-edit-old-pods-serve",
        ),
        pytest.param(
            observed(
                desired_replicas=0, deployment=roll(replicas=0, ready_replicas=0, updated_replicas=0), replicas=[]
            ),
            "Ready",
            ("True", "AllReady"),
            ("False", "AllReady"),
            ("False", "AllReady"),
            id="scaled-to-zero",
        ),
    ],
)
def test_phase_and_conditions(
    obs: Observed, phase: str, ready: tuple[str, str], progressing: tuple[str, str], degraded: tuple[str, str]
) -> None:
    status = aggregate_status(obs, None, T0)
    conds = {c.type: (c.status, c.reason) for c in status.conditions}
    assert (status.phase, conds["Ready"], conds["Progressing"], conds["Degraded"]) == (
        phase,
        ready,
        progressing,
        degraded,
    )
    # The kstatus trio: Reconciling mirrors Progressing; Stalled when neither Ready nor converging.
    assert conds["Reconciling"] == progressing
    stalled = "True" if ready[0] == "False" and progressing[0] == "False" else "False"
    assert conds["Stalled"][0] == stalled
    assert all(c.observed_generation == 4 for c in status.conditions)
    assert status.observed_generation == 4
    assert status.endpoint == "http://s.ml.svc:8000/v1"


def test_summary_fields() -> None:
    obs = observed(
        resolved=[SUPPORT, LEGAL],
        desired_adapters=2,
        replicas=[agent("p1", ("support", "Loaded"), ("legal", "Loading"))],
        deployment=roll(replicas=1, ready_replicas=0),
    )
    status = aggregate_status(obs, None, T0)
    assert (status.replicas, status.ready_replicas, status.adapters_ready) == (1, 0, "1/2")
    assert [(a.name, a.state, a.loaded_replicas) for a in status.adapters] == [
        ("support", "Loaded", 1),
        ("legal", "Loading", 0),
    ]


def test_steady_state_writes_nothing() -> None:
    first = aggregate_status(observed(), None, T0)
    second = aggregate_status(observed(), first, T1)
    assert second == first
    assert status_patch(first.wire(), second) is None


def test_transition_times_move_only_on_change() -> None:
    first = aggregate_status(
        observed(
            resolved=[SUPPORT, LEGAL],
            desired_adapters=2,
            replicas=[agent("p1", ("support", "Loaded"), ("legal", "Loading"))],
        ),
        None,
        T0,
    )
    second = aggregate_status(
        observed(
            resolved=[SUPPORT, LEGAL],
            desired_adapters=2,
            replicas=[agent("p1", ("support", "Loaded"), ("legal", "Loaded"))],
        ),
        first,
        T1,
    )
    times = {a.name: a.last_transition_time for a in second.adapters}
    assert times == {"support": T0, "legal": T1}
    conds = {c.type: c.last_transition_time for c in second.conditions}
    assert conds["Degraded"] == T0  # False before and after
    patch = status_patch(first.wire(), second)
    assert patch is not None and patch["adaptersReady"] == "2/2"


def test_removed_adapter_leaves_status() -> None:
    first = aggregate_status(observed(resolved=[SUPPORT, LEGAL], desired_adapters=2), None, T0)
    second = aggregate_status(observed(), first, T1)
    assert [a.name for a in second.adapters] == ["support"]


def test_status_patch_clears_foreign_keys() -> None:
    new = aggregate_status(observed(), None, T0)
    patch = status_patch({**new.wire(), "legacy": 1}, new)
    assert patch is not None and patch["legacy"] is None


def test_previous_status_round_trips() -> None:
    status = aggregate_status(observed(), None, T0)
    assert AdapterDeploymentStatus.model_validate(status.wire()) == status


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        pytest.param(
            {
                "baseModel": {"uri": "hf://a/b", "servedName": "b"},
                "adapters": [{"name": "x", "uri": "file:///a"}, {"name": "x", "uri": "file:///b"}],
            },
            "listed twice",
            id="duplicate-names",
        ),
        pytest.param(
            {
                "baseModel": {"uri": "hf://a/b", "servedName": "b"},
                "adapters": [{"name": "x", "uri": "file:///a", "loraJobRef": {"name": "j"}}],
            },
            "exactly one of loraJobRef or uri",
            id="two-sources",
        ),
        pytest.param(
            {"baseModel": {"uri": "hf://a/b", "servedName": "b"}, "vllm": {"maxLoras": 9, "maxCpuLoras": 2}},
            "maxCpuLoras",
            id="cpu-loras-below-loras",
        ),
    ],
)
def test_parse_spec_reports_rules_the_crd_cannot(spec: dict[str, Any], needle: str) -> None:
    parsed, invalid = parse_spec({"spec": spec})
    assert parsed is None and invalid is not None and needle in invalid


def test_views_from_objects() -> None:
    dep = deployment_view(
        {
            "metadata": {"generation": 3},
            "status": {
                "observedGeneration": 3,
                "replicas": 2,
                "readyReplicas": 1,
                "updatedReplicas": 2,
                "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
            },
        }
    )
    assert dep == DeploymentView(3, 3, 2, 1, 2, rollout_complete=True, message="")
    pod = pod_view(
        {
            "metadata": {"name": "p", "uid": "u"},
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.5",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"restartCount": 1}, {"restartCount": 2}],
            },
        }
    )
    assert (pod.ip, pod.ready, pod.restarts, pod.pollable) == ("127.0.0.5", True, 3, True)
    assert not pod_view(
        {"metadata": {"name": "p", "deletionTimestamp": "x"}, "status": {"phase": "Running", "podIP": "1"}}
    ).pollable


def test_server_defaults_and_empty_strings_are_not_changes() -> None:
    """A server that fills ``message: ""`` defaults must not make every poll a write; "" is never sent."""
    new = aggregate_status(observed(), None, T0)
    stored = new.wire()
    for cond in stored["conditions"]:
        cond.setdefault("message", "")
    assert status_patch(stored, new) is None
    patch = status_patch(None, new)
    assert patch is not None and '""' not in json.dumps(patch)


def fleet(adapters: int, replicas: int, split: bool) -> Observed:
    """``adapters`` adapters with the longest names the API allows on ``replicas`` replicas; ``split``: half the
    replicas failed every adapter with a page-long engine error, the other half are still loading it."""
    names = [f"adapter-{i:04d}-" + "x" * 49 for i in range(adapters)]
    resolved = [ResolvedAdapter(n, uri=f"s3://a-bucket-with-a-long-name/tenants/{n}/rev-12", digest=D1) for n in names]
    error = "the engine refused the adapter: HTTP 400 BadRequestError: " + "While loading ... " * 120

    def report(index: int) -> ReplicaReport:
        pod = f"support-serving-7d9f8c6b5-{index:05d}"
        if not split:
            return agent(pod, *((n, "Loaded") for n in names))
        state = "Failed" if index % 2 else "Loading"
        return agent(pod, *((n, state) for n in names), reason="LoadFailed", message=error)

    return observed(desired_replicas=replicas, desired_adapters=adapters, resolved=resolved,
                    deployment=roll(replicas=replicas, ready_replicas=replicas, updated_replicas=replicas),
                    replicas=[report(i) for i in range(replicas)])


@pytest.mark.parametrize(("split", "limit_kib"), [(False, 512), (True, 768)])
def test_a_thousand_adapters_on_eight_replicas_fit_well_under_the_object_limit(split: bool, limit_kib: int) -> None:
    status = aggregate_status(fleet(1000, 8, split), None, T0)
    size = len(json.dumps({"status": status.wire()}))
    # the API server refuses objects over ~1.5 MiB: the worst case (longest names and URIs the API allows, every
    # adapter split between replicas, page-long errors) stays at half of it, the steady state at a third
    assert size < limit_kib * 1024, f"{size / 1024:.0f} KiB"
    first = status.adapters[0]
    if split:
        assert first.state == "Failed" and first.loaded_replicas == 0
        assert [r.state for r in first.disagreeing_replicas] == ["Loading"] * 3, "only disagreeing, at most 3"
        assert len(first.message) <= 128 and first.message.endswith("...(truncated)")
        degraded = next(c for c in status.conditions if c.type == "Degraded")
        assert degraded.message.endswith("; ... and 995 more") and len(degraded.message) <= 1024
    else:
        assert first.state == "Loaded" and first.loaded_replicas == 8 and first.disagreeing_replicas == []
        assert status.adapters_ready == "1000/1000"
    print(f"status of 1000 adapters x 8 replicas ({'split' if split else 'all loaded'}): {size / 1024:.0f} KiB")
