"""One background task keeps every AdapterDeployment in step: apply what changed, ask the agents, write status.

Why a task of our own and not a kopf timer: a kopf timer (or daemon) puts kopf's finalizer on every object
it runs for, so deleting an AdapterDeployment would hang whenever the operator is down, for no benefit:
the children are garbage collected through their ownerReferences. The kopf handlers only tell this
:class:`Supervisor` what they saw (an AdapterDeployment's body, a serving pod or Deployment that changed, a
LoRAJob that published), and it runs one ``tick`` per object when due:

resolve the adapters (LoRAJob index) -> build the children (pure) -> server-side apply those that differ from
what this process last applied -> poll the agents (one shared HTTP client) -> patch ``status`` only when the
aggregate differs. A refused apply is reported, never hidden: Stalled (400/403/422) or Reconciling (a retry
may help), the old ``observedGeneration`` kept, and one Warning Event per distinct problem.

Each object is polled every ``adapter_poll_seconds``; once it is Ready and nothing changes, the interval
doubles up to ``IDLE_SECONDS``. Any event about the object or its children brings the next tick forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import kopf
from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus, AdapterStatus
from kubelora.api.common import API_VERSION, now_rfc3339
from kubelora.api.meta import ObjectRef
from kubelora.api.reasons import ConditionType, DeploymentPhase, Reason
from kubelora.handlers import logs, metrics
from kubelora.handlers.adapterdeployment_agents import poll_agents
from kubelora.handlers.adapterdeployment_children import APPLIED_KEY, apply_children, build_children, changed
from kubelora.handlers.kube import ApiError
from kubelora.handlers.kube import path as kube_path
from kubelora.reconcile.adapterdeployment_refs import JobView, ResolvedAdapter, referenced_jobs, resolve_adapters
from kubelora.reconcile.adapterdeployment_spec import parse_spec, status_patch
from kubelora.reconcile.adapterdeployment_status import Observed, Refusal, aggregate_status
from kubelora.reconcile.adapterdeployment_views import DeploymentView, PodView, ReplicaReport
from kubelora.resources.pods import Manifest
from kubelora.resources.serving_common import endpoint, selector_string
from kubelora.resources.serving_engine import ServingSpecError

Key = tuple[str, str]
V = TypeVar("V")
log = logging.getLogger(__name__)

IDLE_SECONDS = 30.0
"""The longest interval between two polls of a Ready AdapterDeployment whose status does not change."""
REFUSED_SECONDS = 30.0
"""Retry interval after a refusal no retry fixes without the user (403/422)."""
RESYNC_SECONDS = 600.0
"""Re-apply every child this often (no-op server-side applies write nothing), which repairs a child that
was edited by hand; a missing Deployment is noticed at once through the index."""
CONCURRENCY = 16
"""Ticks run at once (each polls its agents and may apply children)."""
INPUTS_KEY = "kubelora_inputs"
"""memo key: what the children were last built from, so an unchanged object costs no rebuild per poll."""
RESYNC_KEY = "kubelora_resync_at"

PERSISTENT = {400: Reason.CHILD_REJECTED, 403: Reason.FORBIDDEN, 422: Reason.CHILD_REJECTED}
"""Apply errors no retry fixes without the user: Stalled and a Warning Event."""


Index = Mapping[Key, Iterable[V]]
"""What the supervisor reads from a kopf index (a dict of lists in the unit tests)."""


@dataclass
class Indexes:
    lorajobs: Index[JobView]
    pods: Index[PodView]
    deployments: Index[DeploymentView]

    def values(self, index: Index[V], key: Key) -> list[V]:
        return list(index.get(key, ()))


def refusal(exc: ApiError) -> Refusal:
    """Stalled for 400/403/422 with what to fix; Reconciling (retried) for anything else."""
    reason = PERSISTENT.get(exc.status)
    if reason is None:
        return Refusal(Reason.API_RETRYING, f"{exc}; retrying", persistent=False)
    fix = ("grant the operator's ServiceAccount this permission (the chart's rbac.yaml) or raise the quota"
           if exc.status == 403 else "the API server rejected the object the operator built from this spec")
    return Refusal(reason, f"{exc}; {fix}", persistent=True)


def _previous(body: Mapping[str, Any]) -> AdapterDeploymentStatus | None:
    try:
        return AdapterDeploymentStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


def _served(body: Mapping[str, Any]) -> list[AdapterStatus]:
    previous = _previous(body)
    return previous.adapters if previous is not None else []


def _condition(status: AdapterDeploymentStatus, kind: ConditionType) -> tuple[str, str, str]:
    for cond in status.conditions:
        if cond.type == kind:
            return cond.status, cond.reason, cond.message
    return "Unknown", "", ""


@dataclass
class Tracked:
    """One AdapterDeployment as the supervisor knows it."""

    body: dict[str, Any]
    due: float = 0.0
    interval: float = 0.0
    memo: dict[str, Any] = field(default_factory=dict)
    """Hashes of the children last applied, and the inputs they were built from."""
    warned: str = ""
    """The last Warning Event's message: one Event per distinct problem, not one per retry."""
    running: bool = False
    dirty: bool = False
    """An event arrived during a tick: run again at once."""


class Supervisor:
    """Every known AdapterDeployment and the task that ticks them (``start``/``stop``)."""

    def __init__(self, indexes: Indexes, *, poll_seconds: float, image: str, pull_policy: str,
                 apply: Callable[[Manifest], Awaitable[Any]],
                 patch_status: Callable[[str, Mapping[str, Any]], Awaitable[Any]],
                 client: httpx.AsyncClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.indexes = indexes
        self.poll_seconds = poll_seconds
        self.image = image
        self.pull_policy = pull_policy
        self.apply = apply
        self.patch_status = patch_status
        self.client = client
        self.clock = clock
        self.tracked: dict[Key, Tracked] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._jobs_seen: dict[Key, object] = {}

    # -- what the kopf handlers report -------------------------------------------------------------------
    def seen(self, key: Key, body: Mapping[str, Any]) -> None:
        """An AdapterDeployment event: new objects and spec changes are ticked at once."""
        fresh = copy.deepcopy(dict(body))
        tracked = self.tracked.get(key)
        if tracked is None or (tracked.body.get("metadata") or {}).get("uid") != fresh["metadata"].get("uid"):
            self.tracked[key] = Tracked(body=fresh, interval=self.poll_seconds)
            self.kick(key)
            return
        spec_changed = tracked.body["metadata"].get("generation") != fresh["metadata"].get("generation")
        tracked.body = fresh
        if spec_changed:
            self.kick(key)

    def forget(self, key: Key) -> None:
        self.tracked.pop(key, None)

    def kick(self, key: Key) -> None:
        """Tick ``key`` now (and poll it at the base interval again)."""
        tracked = self.tracked.get(key)
        if tracked is None:
            return
        tracked.interval = self.poll_seconds
        if tracked.running:
            tracked.dirty = True
        tracked.due = 0.0
        self._wake.set()

    def note_job(self, key: Key, mark: object | None) -> bool:
        """Remember what matters of a LoRAJob (None: deleted); True when that changed."""
        if mark is None:
            return self._jobs_seen.pop(key, None) is not None
        changed_ = self._jobs_seen.get(key) != mark
        self._jobs_seen[key] = mark
        return changed_

    def kick_referencing(self, namespace: str, lorajob: str) -> None:
        """A LoRAJob changed: tick every AdapterDeployment of its namespace that serves from it."""
        for (ns, name), tracked in list(self.tracked.items()):
            if ns != namespace:
                continue
            spec, _ = parse_spec(tracked.body)
            if spec is not None and lorajob in referenced_jobs(spec):
                self.kick((ns, name))

    # -- the loop ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="kubelora-adapterdeployments")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._ticks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    async def run(self) -> None:
        while True:
            now = self.clock()
            for key, tracked in list(self.tracked.items()):
                if tracked.due <= now and not tracked.running:
                    tracked.running = True
                    task = asyncio.create_task(self._guarded(key, tracked))
                    self._ticks.add(task)
                    task.add_done_callback(self._ticks.discard)
            waiting = [t.due for t in self.tracked.values() if not t.running]
            delay = min([self.poll_seconds, *(d - now for d in waiting)])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.05))

    async def _guarded(self, key: Key, tracked: Tracked) -> None:
        try:
            async with self._slots:
                with metrics.reconciling("AdapterDeployment") as outcome:
                    status = await self.tick(key, tracked)
                    if _condition(status, ConditionType.STALLED)[0] == "True":
                        outcome.result = metrics.STALLED
        except asyncio.CancelledError:
            raise
        except Exception:  # one object's surprise must not stop the others' polling
            log.exception("AdapterDeployment %s/%s: tick failed", *key, extra=logs.about("AdapterDeployment", *key))
            tracked.interval = min(max(tracked.interval * 2, self.poll_seconds), IDLE_SECONDS)
        finally:
            tracked.running = False
            tracked.due = 0.0 if tracked.dirty else self.clock() + tracked.interval
            tracked.dirty = False
            self._wake.set()

    # -- one object --------------------------------------------------------------------------------------
    async def tick(self, key: Key, tracked: Tracked) -> AdapterDeploymentStatus:
        body = tracked.body
        ref = ObjectRef.of(body)
        spec, invalid = parse_spec(body)
        resolved: list[ResolvedAdapter] = []
        reports: list[ReplicaReport] = []
        refused: Refusal | None = None
        deployment = next(iter(self.indexes.values(self.indexes.deployments, key)), None)
        pods = self.indexes.values(self.indexes.pods, key)
        if spec is not None:
            resolved = resolve_adapters(spec, self._jobs(key[0], spec), _served(body))
            self._forget_applied(tracked, deployment_missing=deployment is None)
            invalid, refused = await self._sync(ref, body, spec, resolved, tracked)
            if invalid is None and refused is None:
                reports = await poll_agents(pods, self.client)
        obs = self._observed(ref, body, spec, invalid, refused, resolved, deployment, pods, reports)
        new = aggregate_status(obs, _previous(body), now_rfc3339())
        diff = status_patch(body.get("status"), new)
        old_phase = (body.get("status") or {}).get("phase")
        if diff is not None:
            await self._write(ref, body, diff, new)
        self._announce(body, old_phase, new, tracked)
        ready = _condition(new, ConditionType.READY)[0] == "True"
        if refused is not None and refused.persistent:
            tracked.interval = REFUSED_SECONDS
        elif diff is None and ready:
            tracked.interval = min(tracked.interval * 2, IDLE_SECONDS)
        else:
            tracked.interval = self.poll_seconds
        return new

    def _jobs(self, namespace: str, spec: AdapterDeploymentSpec) -> dict[str, JobView]:
        out: dict[str, JobView] = {}
        for job in referenced_jobs(spec):
            for view in self.indexes.values(self.indexes.lorajobs, (namespace, job)):
                out[job] = view
        return out

    def _forget_applied(self, tracked: Tracked, deployment_missing: bool) -> None:
        now = self.clock()
        if deployment_missing or now >= tracked.memo.get(RESYNC_KEY, 0.0):
            tracked.memo.pop(INPUTS_KEY, None)
            tracked.memo.pop(APPLIED_KEY, None)
            tracked.memo[RESYNC_KEY] = now + RESYNC_SECONDS

    async def _sync(self, ref: ObjectRef, body: Mapping[str, Any], spec: AdapterDeploymentSpec,
                    resolved: list[ResolvedAdapter], tracked: Tracked) -> tuple[str | None, Refusal | None]:
        """Apply the children that changed; returns (an InvalidSpec message, a refusal), both None when applied."""
        image = spec.vllm.image or self.image
        inputs = copy.deepcopy((ref.uid, body.get("spec"), tuple(resolved), image, self.pull_policy))
        if tracked.memo.get(INPUTS_KEY) == inputs:
            return None, None
        try:
            children = build_children(ref, spec, resolved, image=image, pull_policy=self.pull_policy)
        except ServingSpecError as exc:
            return str(exc), None
        todo = changed(children, tracked.memo)
        if todo:
            try:
                applied = await apply_children(todo, tracked.memo, self.apply)
            except ApiError as exc:
                refused = refusal(exc)
                log.warning("AdapterDeployment %s/%s: %s", ref.namespace, ref.name, exc,
                            extra=logs.about("AdapterDeployment", ref.namespace, ref.name, refused.reason))
                return None, refused
            log.info("AdapterDeployment %s/%s: applied %s", ref.namespace, ref.name, ", ".join(applied))
        tracked.memo[INPUTS_KEY] = inputs
        return None, None

    def _observed(self, ref: ObjectRef, body: Mapping[str, Any], spec: AdapterDeploymentSpec | None,
                  invalid: str | None, refused: Refusal | None, resolved: list[ResolvedAdapter],
                  deployment: DeploymentView | None, pods: list[PodView], reports: list[ReplicaReport]) -> Observed:
        raw_spec = body.get("spec") or {}  # what an invalid spec still says about replicas and adapters
        port = spec.service.port if spec else int((raw_spec.get("service") or {}).get("port") or 8000)
        return Observed(
            generation=ref.generation,
            desired_replicas=spec.replicas if spec else int(raw_spec.get("replicas") or 0),
            endpoint=endpoint(ref, port),
            desired_adapters=len(raw_spec.get("adapters") or []),
            resolved=resolved if invalid is None else [],
            deployment=deployment,
            replicas=reports,
            invalid=invalid,
            refused=refused,
            pods=pods,
            selector=selector_string(ref.name),
        )

    async def _write(self, ref: ObjectRef, body: dict[str, Any], diff: dict[str, Any],
                     new: AdapterDeploymentStatus) -> None:
        path = kube_path(API_VERSION, "AdapterDeployment", ref.namespace, ref.name)
        try:
            await self.patch_status(path, diff)
        except ApiError as exc:  # retried on the next tick (the stored status is still the old one)
            log.warning("AdapterDeployment %s/%s: status not written: %s", ref.namespace, ref.name, exc)
            return
        body["status"] = new.wire()  # until the watch brings the object back: no second identical write

    def _announce(self, before: Mapping[str, Any], old_phase: str | None, new: AdapterDeploymentStatus,
                  tracked: Tracked) -> None:
        """A Normal Event per phase change; one Warning per distinct problem (stall or failed adapters)."""
        stalled, reason, message = _condition(new, ConditionType.STALLED)
        degraded, degraded_reason, degraded_message = _condition(new, ConditionType.DEGRADED)
        if stalled != "True" and degraded == "True" and degraded_reason == Reason.ADAPTERS_FAILED:
            reason, message = degraded_reason, degraded_message
        elif stalled != "True":
            message = ""
        if message and message != tracked.warned:
            _post(before, "Warning", reason, message)
        tracked.warned = message
        if old_phase is not None and old_phase != new.phase and new.phase != DeploymentPhase.FAILED:
            _post(before, "Normal", f"Phase{new.phase}", f"phase {old_phase} -> {new.phase}")


def _post(body: Mapping[str, Any], type: str, reason: str, message: str) -> None:
    with contextlib.suppress(LookupError):  # outside a running operator (unit tests): kopf has no event queue
        kopf.event(kopf.Body(dict(body)), type=type, reason=reason, message=message)  # type: ignore[arg-type]
