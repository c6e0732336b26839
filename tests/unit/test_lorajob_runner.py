"""The handler-side runner against a fake API server: idempotent creates, 404s, status writes, coalescing."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

from kubelora.handlers.kube import ApiError, path
from kubelora.handlers.lorajob_runner import Reconciler
from kubelora.reconcile.lorajob_observed import Observed, job_state
from kubelora.settings import Settings

SPEC = {
    "baseModel": {"uri": "pvc://models/tiny"},
    "dataset": {"uri": "pvc://data/train.jsonl"},
    "output": {"uri": "pvc://adapters/bot"},
    "method": "lora",
    "resources": {"gpus": 0},
}
LJ = path("kubelora.io/v1alpha1", "LoRAJob", "ml", "bot")


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeApi:
    """Objects by path; POST of an existing path is 409, GET/DELETE of a missing one 404."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], int] = {}
        self.gate: asyncio.Event | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        self.calls.append((method, path))
        if self.gate is not None:
            await self.gate.wait()
        if (method, path) in self.fail:
            raise ApiError(self.fail[(method, path)], "injected")
        if method == "POST":
            assert body is not None
            target = f"{path}/{body['metadata']['name']}"
            if target in self.objects:
                raise ApiError(409, "AlreadyExists")
            self.objects[target] = body
            return body
        if method == "GET" and params:
            return {"items": []}
        target = path.removesuffix("/status")
        if target not in self.objects:
            raise ApiError(404, "NotFound")
        if method == "DELETE":
            self.objects[target].setdefault("metadata", {})["deletionTimestamp"] = "now"
            return {}
        if method == "PATCH":
            assert body is not None and content_type == "application/merge-patch+json"
            self.objects[target] = merge(self.objects[target], body)
        return copy.deepcopy(self.objects[target])

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "GET"]


def lorajob(**status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "LoRAJob",
        "spec": SPEC,
        "metadata": {"name": "bot", "namespace": "ml", "uid": "u1", "generation": 1},
    }
    if status:
        body["status"] = status
    return body


def nothing(_: str) -> Observed:
    return Observed()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_first_reconcile_creates_preflight_and_writes_status_once() -> None:
    api = FakeApi({LJ: lorajob()})
    rec = Reconciler(api, Settings())
    run(rec.kick(("ml", "bot"), nothing))
    assert api.writes() == [
        ("POST", "/api/v1/namespaces/ml/configmaps"),
        ("POST", "/apis/batch/v1/namespaces/ml/jobs"),
        ("PATCH", LJ + "/status"),
    ]
    assert api.objects[LJ]["status"]["phase"] == "Validating"
    observed = Observed(jobs=(job_state(api.objects["/apis/batch/v1/namespaces/ml/jobs/bot-validate-1"]),))
    api.calls.clear()
    run(rec.kick(("ml", "bot"), lambda _: observed))
    assert api.writes() == [], "a second reconcile with the same facts must not write"


def owned(uid: str = "u1", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": uid, "controller": True}]}
    if deleting:
        meta["deletionTimestamp"] = "now"
    return {"metadata": meta}


CM = "/api/v1/namespaces/ml/configmaps/bot-trainer-1"
VJOB = "/apis/batch/v1/namespaces/ml/jobs/bot-validate-1"


def test_existing_children_are_fine() -> None:
    """A restarted operator that lost the status patch re-creates: a 409 on its own child is success."""
    api = FakeApi({LJ: lorajob(), CM: owned(), VJOB: owned()})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), nothing))
    assert api.objects[LJ]["status"]["validationJobName"] == "bot-validate-1"
    assert sum(1 for m, p in api.calls if m == "POST") == 2
    assert ("GET", CM) in api.calls, "the 409 is followed by a read of the owner"


def stalled(api: FakeApi) -> dict[str, Any]:
    return next(c for c in api.objects[LJ]["status"]["conditions"] if c["type"] == "Stalled")


def cancel_retries(rec: Reconciler) -> int:
    for task in rec._tasks:
        task.cancel()
    return len(rec._tasks)


def test_children_of_an_earlier_lorajob_of_the_same_name_are_not_taken_over() -> None:
    """Delete + re-create under the same name while the old ConfigMap waits for the garbage collector."""

    async def scenario() -> tuple[FakeApi, int]:
        api = FakeApi({LJ: lorajob(), CM: owned(uid="old-uid", deleting=True)})
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)
        return api, cancel_retries(rec)

    api, retries = run(scenario())
    assert retries == 1
    assert ("POST", "/apis/batch/v1/namespaces/ml/jobs") not in api.calls, "no Job may mount the old ConfigMap"
    cond = stalled(api)
    assert cond["status"] == "True" and cond["reason"] == "NameConflict"
    assert "earlier LoRAJob of the same name" in cond["message"]
    assert "observedGeneration" not in api.objects[LJ]["status"], "the generation is not applied yet"


def test_a_foreign_object_in_the_way_is_reported() -> None:
    async def scenario() -> FakeApi:
        api = FakeApi({LJ: lorajob(), CM: {"metadata": {}}})
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)
        cancel_retries(rec)
        return api

    cond = stalled(run(scenario()))
    assert cond["reason"] == "NameConflict" and "not owned by this LoRAJob; delete or rename it" in cond["message"]


def test_index_lag_is_filled_by_a_direct_read() -> None:
    """Status names a Job the index has not seen yet: read it instead of declaring it vanished."""
    train = {
        "metadata": {
            "name": "bot-train-1",
            "labels": {"app.kubernetes.io/component": "trainer", "kubelora.io/revision": "1"},
            "ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": "u1", "controller": True}],
        },
        "status": {"active": 1},
    }
    status = {
        "phase": "Running",
        "revision": 1,
        "jobName": "bot-train-1",
        "validationJobName": "bot-validate-1",
        "observedGeneration": 1,
    }
    api = FakeApi({LJ: lorajob(**status), "/apis/batch/v1/namespaces/ml/jobs/bot-train-1": train})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), nothing))
    assert api.objects[LJ]["status"]["phase"] == "Running"
    assert ("GET", "/apis/batch/v1/namespaces/ml/jobs/bot-train-1") in api.calls


def test_finished_job_without_pod_status_lists_its_pods() -> None:
    train = {
        "metadata": {
            "name": "bot-train-1",
            "labels": {"app.kubernetes.io/component": "trainer", "kubelora.io/revision": "1"},
            "ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": "u1", "controller": True}],
        },
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
    }
    status = {"phase": "Running", "revision": 1, "jobName": "bot-train-1", "observedGeneration": 1}
    api = FakeApi({LJ: lorajob(**status)})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), lambda _: Observed(jobs=(job_state(train),))))
    assert ("GET", "/api/v1/namespaces/ml/pods") in api.calls


def test_deleted_lorajob_is_ignored() -> None:
    api = FakeApi({})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), nothing))
    assert api.writes() == []


def test_lorajob_deleted_between_read_and_status_patch() -> None:
    """A 404 on the status patch means the LoRAJob is gone: done, not an error to retry (kick swallows those)."""

    async def scenario() -> tuple[Reconciler, int]:
        api = FakeApi({LJ: lorajob()})
        api.fail[("PATCH", LJ + "/status")] = 404
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)
        return rec, cancel_retries(rec)

    rec, retries = run(scenario())
    assert retries == 0 and rec.last_error is None and rec._failures == {}


def test_terminating_lorajob_is_left_to_garbage_collection() -> None:
    body = lorajob()
    body["metadata"]["deletionTimestamp"] = "now"
    api = FakeApi({LJ: body})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), nothing))
    assert api.writes() == []


def test_transient_api_errors_are_retried_with_backoff() -> None:
    async def scenario() -> tuple[FakeApi, Reconciler]:
        api = FakeApi({LJ: lorajob()})
        api.fail[("POST", "/apis/batch/v1/namespaces/ml/jobs")] = 503
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)
        assert cancel_retries(rec) == 1
        return api, rec

    api, rec = run(scenario())
    assert rec.last_error is not None and rec.last_error.status == 503
    assert "status" not in api.objects[LJ], "status is written only after the children exist"


def test_forbidden_create_is_a_stalled_condition_and_one_event(monkeypatch: Any) -> None:
    from kubelora.handlers import lorajob_runner

    events: list[tuple[str, str]] = []
    monkeypatch.setattr(lorajob_runner, "warn", lambda body, reason, message: events.append((reason, message)))

    async def scenario() -> tuple[FakeApi, Reconciler]:
        api = FakeApi({LJ: lorajob()})
        api.fail[("POST", "/apis/batch/v1/namespaces/ml/jobs")] = 403
        rec = Reconciler(api, Settings())
        for _ in range(3):  # the first try and two retries
            await rec.kick(("ml", "bot"), nothing)
            assert cancel_retries(rec) == 1
            rec._tasks.clear()
        return api, rec

    api, rec = run(scenario())
    cond = stalled(api)
    assert cond["status"] == "True" and cond["reason"] == "Forbidden"
    assert "cannot create Job bot-validate-1" in cond["message"] and "ServiceAccount" in cond["message"]
    status = api.objects[LJ]["status"]
    assert "validationJobName" not in status and status["phase"] == "Pending", "nothing that did not happen is recorded"
    assert [r for r, _ in events] == ["Forbidden"], "one Warning Event per distinct problem, not one per retry"
    assert sum(1 for c in api.calls if c == ("PATCH", LJ + "/status")) == 1, "retries with the same error write nothing"

    del api.fail[("POST", "/apis/batch/v1/namespaces/ml/jobs")]
    run(rec.kick(("ml", "bot"), nothing))
    assert stalled(api)["status"] == "False" and api.objects[LJ]["status"]["phase"] == "Validating"


def test_suspend_sets_job_suspend() -> None:
    train = {
        "metadata": {
            "name": "bot-train-1",
            "labels": {"app.kubernetes.io/component": "trainer", "kubelora.io/revision": "1"},
            "ownerReferences": [{"kind": "LoRAJob", "name": "bot", "uid": "u1", "controller": True}],
        },
        "status": {"active": 1},
    }
    body = lorajob(phase="Running", revision=1, jobName="bot-train-1", observedGeneration=1)
    body["spec"] = {**SPEC, "suspend": True}
    body["metadata"]["generation"] = 2
    api = FakeApi({LJ: body, "/apis/batch/v1/namespaces/ml/jobs/bot-train-1": train})
    run(Reconciler(api, Settings()).kick(("ml", "bot"), lambda _: Observed(jobs=(job_state(train),))))
    assert ("PATCH", "/apis/batch/v1/namespaces/ml/jobs/bot-train-1") in api.calls
    assert ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/bot-train-1") not in api.calls, "checkpoints and Job kept"
    assert api.objects["/apis/batch/v1/namespaces/ml/jobs/bot-train-1"]["spec"]["suspend"] is True
    assert api.objects[LJ]["status"]["phase"] == "Suspended"


def test_child_events_are_coalesced() -> None:
    async def scenario() -> FakeApi:
        api = FakeApi({LJ: lorajob()})
        api.gate = asyncio.Event()
        rec = Reconciler(api, Settings())
        first = asyncio.create_task(rec.kick(("ml", "bot"), nothing))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(rec.kick(("ml", "bot"), nothing)) for _ in range(10)]
        await asyncio.sleep(0)
        api.gate.set()
        await asyncio.gather(first, *waiting)
        return api

    api = run(scenario())
    gets = [c for c in api.calls if c == ("GET", LJ)]
    assert len(gets) == 2, "one running reconcile plus one that covers all events that came meanwhile"


def test_failed_child_event_reconcile_is_retried() -> None:
    async def scenario() -> FakeApi:
        api = FakeApi({LJ: lorajob()})
        api.fail[("GET", LJ)] = 500
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)
        assert len(rec._tasks) == 1
        del api.fail[("GET", LJ)]
        await asyncio.gather(*rec._tasks)
        return api

    api = run(scenario())
    assert api.objects[LJ]["status"]["phase"] == "Validating"
