"""The chart's ClusterRoles grant exactly what the operator's code uses: nothing missing, no extra verb.

What the code needs is computed, not listed by hand:

* every request the operator's one client (handlers/kube.py) makes, recorded while the real LoRAJob reconciler
  and AdapterDeployment supervisor run through a lifecycle against a recording API (every action kind the pure
  LoRAJob reconcile plans, each create also answered 409 so the owner check's read is recorded);
* list+watch for every resource a kopf handler or index is registered for (kopf's registry);
* what the API server demands because of what the operator sends: the rules of each Role it creates (RBAC
  escalation prevention: one may only grant what one holds) and ``<owner>/finalizers`` update for children
  carrying ``blockOwnerDeletion`` (OwnerReferencesPermissionEnforcement);
* kopf's own machinery, from its source (kopf/_cogs/structs/references.py and _core/reactor, _core/engines):
  Events are posted as core v1 ``events`` (create only), CRDs are listed and watched to discover resources,
  namespaces only when watching named namespaces, and peering lists/watches its kind and patches its object.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import TrainerRunConfig
from kubelora.handlers import kube
from kubelora.handlers.adapterdeployment_agents import agent_client
from kubelora.handlers.adapterdeployment_loop import Indexes, Supervisor
from kubelora.handlers.kube import ApiError
from kubelora.handlers.lorajob_runner import Blocked, Reconciler
from kubelora.reconcile.adapterdeployment_views import DeploymentView, PodView
from kubelora.reconcile.lorajob_actions import Action
from kubelora.reconcile.lorajob_observed import Observed, job_state
from kubelora.settings import Settings

from .test_chart import render
from .test_lorajob_runner import LJ, FakeApi, lorajob
from .test_lorajob_world import World, result, vjob, vpod

Need = tuple[str, str, str, tuple[str, ...]]
"""(API group, resource[/subresource], verb, resourceNames; () for any name)."""
PEERING = "kubelora"


def request_needs(method: str, url: str, params: Mapping[str, str] | None, content_type: str) -> set[Need]:
    """The RBAC verbs one REST request is authorized against."""
    parts = urlsplit(url).path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    assert rest[0] == "namespaces", f"the operator only calls namespaced objects: {url}"
    resource, named = rest[2], len(rest) > 3
    if len(rest) > 4:
        resource = f"{resource}/{rest[4]}"
    if method == "GET":
        verb = "get" if named else ("watch" if (params or {}).get("watch") else "list")
        get: set[Need] = {(group, resource, verb, ())}
        return get
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    needs: set[Need] = {(group, resource, verb, ())}
    if content_type == kube.APPLY_PATCH:
        needs.add((group, resource, "create", ()))  # an apply that creates the object is authorized as create too
    return needs


def body_needs(manifest: Mapping[str, Any]) -> set[Need]:
    """What the API server checks because of the object's content."""
    needs: set[Need] = set()
    if manifest.get("kind") == "Role":
        for rule in manifest["rules"]:  # escalation prevention: the operator must hold what it grants
            needs |= {(g, r, v, ()) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for ref in manifest.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("blockOwnerDeletion"):
            group = ref["apiVersion"].rpartition("/")[0]
            needs.add((group, f"{kube.PLURALS[ref['kind']]}/finalizers", "update", ()))
    return needs


class Recorder(FakeApi):
    """The runner's fake API server, recording what each request needs."""

    def __init__(self, objects: dict[str, dict[str, Any]], conflict: bool = False) -> None:
        super().__init__(objects)
        self.needs: set[Need] = set()
        self.conflict = conflict

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> Any:
        self.needs |= request_needs(method, path, params, content_type)
        if body is not None:
            self.needs |= body_needs(body)
        if content_type == kube.APPLY_PATCH:
            return body
        if method == "POST" and self.conflict:
            assert body is not None
            self.objects[f"{path}/{body['metadata']['name']}"] = {"metadata": {"ownerReferences": []}}
        return await super().request(method, path, body, params=params, content_type=content_type)


def lorajob_actions() -> list[Action]:
    """Every action the pure reconcile plans over a run: preflight, training, suspend, a restarted preflight."""
    world = World()
    plans = [world.step()]
    world.put(vjob(succeeded=1, condition="Complete"), vpod("Succeeded", exit_code=0, message=result(validation=True)))
    plans.append(world.step())
    world.edit(suspend=True)
    plans.append(world.step())
    restarted = World()
    restarted.step()
    restarted.run_config = TrainerRunConfig(name="bot", namespace="ml", revision=1,
                                            spec=LoRAJobSpec.model_validate(restarted.spec))
    restarted.edit(dataset={"uri": "pvc://data/fixed.jsonl"})
    plans.append(restarted.step())
    actions = [a for p in plans for a in p.actions]
    assert {type(a).__name__ for a in actions} == {"Create", "Delete", "Suspend"}, actions
    return actions


def lorajob_needs() -> set[Need]:
    needs: set[Need] = set()
    for action in lorajob_actions():
        for conflict in (False, True):
            api = Recorder({"/apis/batch/v1/namespaces/ml/jobs/" + action.name: {"metadata": {}}}, conflict)
            with contextlib.suppress(Blocked):  # a foreign object in the way: the owner check read it
                asyncio.run(Reconciler(api, Settings())._act("ml", action))
            needs |= api.needs
    # The reads around the plan: the LoRAJob, Jobs the index lacks, pods of a finished Job, a revision's ConfigMap.
    train = {"metadata": {"name": "bot-train-1", "labels": {"app.kubernetes.io/component": "trainer",
                                                            "kubelora.io/revision": "1"},
                          "ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": "u1", "controller": True}]},
             "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    running = lorajob(phase="Running", revision=1, jobName="bot-train-1", observedGeneration=1)
    edited = copy.deepcopy(running)
    edited["metadata"]["generation"] = 2
    for body, observed in ((running, Observed()), (running, Observed(jobs=(job_state(train),))),
                           (edited, Observed(jobs=(job_state(train),)))):
        api = Recorder({LJ: copy.deepcopy(body), "/apis/batch/v1/namespaces/ml/jobs/bot-train-1": train})
        rec = Reconciler(api, Settings())
        asyncio.run(rec.kick(("ml", "bot"), lambda _, o=observed: o))
        for task in rec._tasks:
            task.cancel()
        needs |= api.needs
    return needs


def adapterdeployment_needs() -> set[Need]:
    api = Recorder({})
    body = {"apiVersion": "kubelora.io/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"baseModel": {"uri": "file:///m", "servedName": "m"}, "engine": "cpu", "replicas": 1,
                     "resources": {"gpus": 0}, "adapters": [{"name": "a", "uri": "file:///a"}]}}
    key = ("ml", "chat")
    report = {"pod": "p1", "engineReady": True, "adapters": [{"name": "a", "state": "Loaded"}]}
    rolled = DeploymentView(generation=1, observed_generation=1, replicas=1, ready_replicas=1, updated_replicas=1,
                            rollout_complete=True)

    async def tick() -> None:
        client = agent_client(httpx.MockTransport(lambda _r: httpx.Response(200, json=report)))
        sup = Supervisor(Indexes({}, {key: [PodView("p1", "u", "10.0.0.1", "Running", True, False)]},
                                 {key: [rolled]}), poll_seconds=2.0, image="ghcr.io/kubelora/server:t",
                         pull_policy="Never", apply=lambda m: kube.apply(api, m, "kubelora-operator"),
                         patch_status=lambda p, s: kube.patch_status(api, p, s, "kubelora-operator"), client=client)
        sup.seen(key, body)
        await sup.tick(key, sup.tracked[key])
        await client.aclose()

    api.objects[kube.path("kubelora.io/v1alpha1", "AdapterDeployment", "ml", "chat")] = body
    asyncio.run(tick())
    assert ("policy", "poddisruptionbudgets", "patch", ()) in api.needs, "the supervisor applied its children"
    assert ("kubelora.io", "adapterdeployments/status", "patch", ()) in api.needs, "and wrote status"
    return api.needs


def kopf_needs() -> set[Need]:
    import kopf

    import kubelora.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    selectors = {h.selector for reg in (registry._indexing, registry._watching, registry._changing,
                                        registry._spawning, registry._webhooks)
                 for h in reg.get_all_handlers() if h.selector is not None}
    assert not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers(), (
        "change handlers, timers and daemons make kopf patch finalizers and annotations: add those verbs")
    needs: set[Need] = set()
    for selector in selectors:
        plural = selector.plural or selector.any_name  # the handlers name plurals: ("", "v1", "pods")
        assert selector.group is not None and isinstance(plural, str) and plural.islower(), selector
        needs |= {(selector.group, str(plural), verb, ()) for verb in ("list", "watch")}
    return needs


def code_needs(*, namespaced: bool, peering: bool) -> set[Need]:
    needs = lorajob_needs() | adapterdeployment_needs() | kopf_needs()
    needs |= {("", "events", "create", ()),  # kopf's event poster (core v1 only)
              ("apiextensions.k8s.io", "customresourcedefinitions", "list", ()),  # kopf's resource scanner
              ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ())}
    if namespaced:  # kopf's namespace observer; cluster-wide it never lists namespaces
        needs |= {("", "namespaces", "list", ()), ("", "namespaces", "watch", ())}
    if peering:
        kind = "kopfpeerings" if namespaced else "clusterkopfpeerings"
        needs |= {("kopf.dev", kind, "list", ()), ("kopf.dev", kind, "watch", ()),
                  ("kopf.dev", kind, "patch", (PEERING,))}
    return needs


def granted(docs: list[dict[str, Any]]) -> set[Need]:
    out: set[Need] = set()
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            names = tuple(sorted(rule.get("resourceNames") or ()))
            out |= {(g, r, v, names) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


@pytest.fixture(scope="module")
def needs() -> dict[tuple[bool, bool], set[Need]]:
    return {(ns, peer): code_needs(namespaced=ns, peering=peer) for ns in (False, True) for peer in (False, True)}


@pytest.mark.parametrize(
    ("sets", "namespaced", "peering"),
    [
        pytest.param((), False, False, id="default"),
        pytest.param(("replicas=2", "peering.enabled=true"), False, True, id="ha"),
        pytest.param(("watchNamespaces={a,b}",), True, False, id="namespaced"),
        pytest.param(("watchNamespaces={a,b}", "replicas=2", "peering.enabled=true"), True, True, id="namespaced-ha"),
    ],
)
def test_cluster_roles_grant_exactly_what_the_code_uses(
    needs: dict[tuple[bool, bool], set[Need]], sets: tuple[str, ...], namespaced: bool, peering: bool
) -> None:
    want, have = needs[namespaced, peering], granted(render(*sets))
    assert not want - have, f"the operator needs but the chart does not grant: {sorted(want - have)}"
    assert not have - want, f"the chart grants what no code uses: {sorted(have - want)}"


def test_request_needs_reads_verbs_from_requests() -> None:
    """The mapping the comparison rests on, on the paths the operator sends."""
    jobs = "/apis/batch/v1/namespaces/ml/jobs"
    assert request_needs("GET", f"{jobs}/x", None, "") == {("batch", "jobs", "get", ())}
    assert request_needs("GET", "/api/v1/namespaces/ml/pods", {"labelSelector": "a=b"}, "") == {
        ("", "pods", "list", ())}
    assert request_needs("PATCH", f"{LJ}/status", None, kube.MERGE_PATCH) == {
        ("kubelora.io", "lorajobs/status", "patch", ())}
    assert request_needs("PATCH", f"{jobs}/x", None, kube.APPLY_PATCH) == {
        ("batch", "jobs", "patch", ()), ("batch", "jobs", "create", ())}
    owner = ObjectRef(api_version="kubelora.io/v1alpha1", kind="LoRAJob", namespace="ml", name="bot", uid="u",
                      generation=1)
    assert body_needs({"kind": "Job", "metadata": {"ownerReferences": [owner.owner_reference()]}}) == {
        ("kubelora.io", "lorajobs/finalizers", "update", ())}


def test_a_refused_request_is_not_a_need() -> None:
    """A 403 from the recorder would hide a call site; make sure the fake never refuses by default."""
    api = Recorder({})
    with pytest.raises(ApiError) as err:
        asyncio.run(api.request("GET", f"{LJ}x"))
    assert err.value.status == 404
