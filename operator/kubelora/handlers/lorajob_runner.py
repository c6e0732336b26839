"""Run the pure LoRAJob reconcile against the API: read, decide, create/delete, patch status, post Events.

One reconcile of one LoRAJob at a time (a lock per object), because LoRAJob, Job and Pod events
arrive on separate watch streams and would otherwise race on the same status. Child events are
coalesced: while a reconcile of an object waits for its lock, further events for it are dropped,
since the waiting reconcile reads everything afresh anyway.

Children are observed through kopf indexes (no polling, no list calls). Indexes follow watch
streams and may lag a just-made change, so names the status refers to but the index lacks are read
once directly (:meth:`Reconciler._fill_gaps`) before the pure logic concludes a Job vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import kopf

from kubelora.api.common import now_rfc3339
from kubelora.api.meta import ObjectRef
from kubelora.api.reasons import JobPhase, Reason
from kubelora.api.runtime import TrainerRunConfig
from kubelora.handlers import logs, metrics
from kubelora.handlers.kube import MERGE_PATCH, Api, ApiError, path
from kubelora.reconcile.lorajob import Plan, reconcile
from kubelora.reconcile.lorajob_actions import Action, Create, Delete
from kubelora.reconcile.lorajob_inputs import (
    INPUT_POLL_SECONDS,
    awaits_inputs,
    needs_inputs,
    published_adapter,
    referenced_jobs,
)
from kubelora.reconcile.lorajob_object import LoRAJobObject, parse_lorajob
from kubelora.reconcile.lorajob_observed import Observed, controller_uid, job_state, pod_state
from kubelora.reconcile.lorajob_status import TERMINAL, blocked_status, status_patch
from kubelora.resources.lorajob_config import parse_trainer_config_map
from kubelora.resources.lorajob_names import JOB_NAME_LABEL, trainer_config_name
from kubelora.settings import Settings

Key = tuple[str, str]
"""(namespace, LoRAJob name)."""
Observer = Callable[[str], Observed]
"""Observed children of a LoRAJob, by its name, from the indexes."""
LORAJOB_API = "kubelora.io/v1alpha1"
MAX_REQUEUES = 3
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

log = logging.getLogger(__name__)


PERSISTENT = {400: Reason.CHILD_REJECTED, 403: Reason.FORBIDDEN, 422: Reason.CHILD_REJECTED}
"""API errors no retry fixes without the user: they become Stalled and a Warning Event."""


def _delay(status: int, attempt: int) -> float:
    """Back off longer for errors a retry cannot fix quickly (RBAC, invalid manifests)."""
    base = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
    return max(base, 30.0) if status in PERSISTENT else base


class Blocked(Exception):
    """An action the operator cannot take until the user acts; ``reason``/``message`` go into Stalled."""

    def __init__(self, reason: Reason, message: str, retry: float = 30.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


def blocked_by(exc: ApiError, action: Action) -> Blocked | None:
    """The Stalled verdict for a refused action, or None when a retry may succeed (5xx, timeouts, 429)."""
    reason = PERSISTENT.get(exc.status)
    if reason is None:
        return None
    verb = "create" if isinstance(action, Create) else "delete" if isinstance(action, Delete) else "update"
    what = f"{action.kind} {action.name}"
    fix = ("grant the operator's ServiceAccount this permission (see the chart's rbac.yaml) or raise the quota"
           if exc.status == 403 else "the object the operator built was refused; check the spec fields it uses")
    return Blocked(reason, f"cannot {verb} {what}: {exc}; {fix}")

def _ref_extra(key: Key, reason: str) -> dict[str, Any]:
    return logs.about("LoRAJob", key[0], key[1], reason)


class Reconciler:
    def __init__(self, api: Api, settings: Settings) -> None:
        self.api = api
        self.settings = settings
        self._locks: dict[Key, asyncio.Lock] = {}
        self._pending: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._configs: dict[tuple[str, int], TrainerRunConfig] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: dict[Key, str] = {}
        """The last Warning Event posted per object: one Event per distinct problem, not one per retry."""
        self.last_error: ApiError | None = None

    async def kick(self, key: Key, observe: Observer) -> None:
        """Reconcile; coalesced per object, and retried here with backoff since kopf does not retry events."""
        if key in self._pending:
            return
        self._pending.add(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            self._pending.discard(key)
            with metrics.reconciling("LoRAJob") as outcome:
                try:
                    await self._reconcile(key, observe)
                except Blocked as exc:
                    outcome.result = metrics.STALLED
                    log.warning("LoRAJob %s/%s is stalled: %s", *key, exc.message,
                                extra=_ref_extra(key, exc.reason))
                    self._retry(key, observe, exc.retry)
                except ApiError as exc:
                    outcome.result = metrics.ERROR
                    attempt = self._failures.get(key, 0)
                    self._failures[key] = attempt + 1
                    delay = _delay(exc.status, attempt)
                    log.warning("reconcile of %s/%s failed (%s); retrying in %.0f s", *key, exc, delay,
                                extra=_ref_extra(key, f"HTTP{exc.status}" if exc.status else "Unreachable"))
                    self.last_error = exc
                    self._retry(key, observe, delay)
                else:
                    self._failures.pop(key, None)

    def _retry(self, key: Key, observe: Observer, delay: float) -> None:
        task = asyncio.create_task(self._later(key, observe, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, key: Key, observe: Observer, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.kick(key, observe)

    async def _reconcile(self, key: Key, observe: Observer) -> None:
        namespace, name = key
        for _ in range(MAX_REQUEUES):
            try:
                body = await self.api.request("GET", path(LORAJOB_API, "LoRAJob", namespace, name))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self._forget(key)
                return
            if body["metadata"].get("deletionTimestamp"):
                return  # garbage collection removes the children; nothing to report any more
            job = parse_lorajob(body)
            observed = await self._with_inputs(job, await self._fill_gaps(job, observe(name)))
            if awaits_inputs(job, observed):
                self._retry(key, observe, INPUT_POLL_SECONDS)
            plan = reconcile(job, observed, await self._run_config(job), self.settings, now_rfc3339())
            if not await self._apply(job, plan):
                return
            if not plan.requeue:
                return

    def _forget(self, key: Key) -> None:
        self._locks.pop(key, None)
        self._failures.pop(key, None)
        self._warned.pop(key, None)

    async def _fill_gaps(self, job: LoRAJobObject, observed: Observed) -> Observed:
        """Read directly what the index may not show yet: Jobs named in the status, pods of finished Jobs."""
        status = job.status
        if status.phase in TERMINAL:
            return observed
        namespace = job.ref.namespace
        jobs, pods = list(observed.jobs), list(observed.pods)
        for name in {status.job_name, status.validation_job_name} - {None}:
            assert name is not None
            if observed.job(name) is None:
                try:
                    jobs.append(job_state(await self.api.request("GET", path("batch/v1", "Job", namespace, name))))
                except ApiError as exc:
                    if exc.status != 404:
                        raise
        for child in jobs:
            if child.finished and not any(p.termination for p in observed.pods_of(child.name)):
                listed = await self.api.request("GET", path("v1", "Pod", namespace),
                                                params={"labelSelector": f"{JOB_NAME_LABEL}={child.name}"})
                pods = [p for p in pods if p.job_name != child.name] + [pod_state(p) for p in listed.get("items", [])]
        return replace(observed, jobs=tuple(jobs), pods=tuple(pods))

    async def _with_inputs(self, job: LoRAJobObject, observed: Observed) -> Observed:
        """What the LoRAJobs named in spec.combine.inputs published (read only while pre-flight has not begun)."""
        if not needs_inputs(job, observed):
            return observed
        published: dict[str, tuple[str, str]] = {}
        for ref in referenced_jobs(job.spec):
            try:
                body = await self.api.request("GET", path(LORAJOB_API, "LoRAJob", job.ref.namespace, ref))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                continue
            found = published_adapter(body)
            if found is not None:
                published[ref] = found
        return replace(observed, inputs=published)

    async def _run_config(self, job: LoRAJobObject) -> TrainerRunConfig | None:
        """The frozen spec of the current revision; only needed once the spec moved on from it."""
        revision = job.status.revision
        if revision is None or revision == job.ref.generation:
            return None
        cache_key = (job.ref.uid, revision)
        if cache_key not in self._configs:
            try:
                config_map = await self.api.request(
                    "GET", path("v1", "ConfigMap", job.ref.namespace, trainer_config_name(job.ref.name, revision)))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return None
            config = parse_trainer_config_map(config_map)
            if config is None:
                return None
            self._configs[cache_key] = config  # immutable ConfigMap: safe to keep
        return self._configs[cache_key]

    async def _act(self, namespace: str, action: Action) -> None:
        try:
            await self._call(namespace, action)
        except ApiError as exc:
            blocked = blocked_by(exc, action)
            if blocked is None:
                raise
            raise blocked from exc

    async def _call(self, namespace: str, action: Action) -> None:
        if isinstance(action, Create):
            manifest = action.manifest
            collection = path(manifest["apiVersion"], manifest["kind"], namespace)
            try:
                await self.api.request("POST", collection, manifest)
                log.info("created %s %s/%s", action.kind, namespace, action.name)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                await self._check_owner(namespace, action)
            return
        if not isinstance(action, Delete):
            await self.api.request("PATCH", path("batch/v1", "Job", namespace, action.name),
                                   {"spec": {"suspend": action.suspend}}, content_type=MERGE_PATCH)
            log.info("%s", action)
            return
        try:
            await self.api.request("DELETE", path(action.api_version, action.kind, namespace, action.name),
                                   {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
            log.info("deleted %s %s/%s", action.kind, namespace, action.name)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _check_owner(self, namespace: str, action: Create) -> None:
        """A 409 is ours only if the existing object's controller is this LoRAJob (same uid).

        An earlier reconcile whose status patch was lost made it: fine. A LoRAJob deleted and
        re-created under the same name left it for the garbage collector: wait. Anything else
        belongs to someone else: the user must rename or remove it.
        """
        manifest = action.manifest
        existing = await self.api.request("GET", path(manifest["apiVersion"], action.kind, namespace, action.name))
        want = manifest["metadata"]["ownerReferences"][0]["uid"]
        have = controller_uid(existing)
        if have == want:
            return
        what = f"{action.kind} {namespace}/{action.name}"
        if existing["metadata"].get("deletionTimestamp") or have:
            raise Blocked(Reason.NAME_CONFLICT, f"waiting for {what} of an earlier LoRAJob of the same name to be "
                          "deleted by the garbage collector", retry=2.0)
        raise Blocked(Reason.NAME_CONFLICT, f"{what} exists and is not owned by this LoRAJob; delete or rename it")

    async def _apply(self, job: LoRAJobObject, plan: Plan) -> bool:
        """Act, then patch the status; False when the LoRAJob is gone.

        When an action is refused for good, the status says so (Stalled) instead of recording a plan
        that never happened, and one Warning Event per distinct problem tells the user what to fix.
        """
        ref = job.ref
        key = (ref.namespace, ref.name)
        try:
            for action in plan.actions:
                await self._act(ref.namespace, action)
        except Blocked as exc:
            await self._patch_status(ref, status_patch(job.stored_status, blocked_status(
                job.stored_status, exc.reason, exc.message, now_rfc3339())))
            if self._warned.get(key) != exc.message:
                self._warned[key] = exc.message
                warn(ref, exc.reason, exc.message)
            raise
        self._warned.pop(key, None)
        if not await self._patch_status(ref, plan.patch):
            return False
        if plan.transitioned:
            post_transition(ref, plan)
        for reason, message in plan.warnings:
            warn(ref, reason, message)
        for reason, message in plan.notices:
            notice(ref, reason, message)
        return True

    async def _patch_status(self, ref: ObjectRef, patch: Mapping[str, Any]) -> bool:
        """Merge-patch the status (nothing when empty); False when the LoRAJob is gone."""
        if not patch:
            return True
        try:
            await self.api.request("PATCH", path(LORAJOB_API, "LoRAJob", ref.namespace, ref.name, "status"),
                                   {"status": dict(patch)}, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


def warn(ref: ObjectRef, reason: str, message: str) -> None:
    with contextlib.suppress(LookupError):  # outside a running operator (unit tests): kopf has no event queue
        kopf.warn(kopf.Body(ref.event_body()), reason=reason, message=message)  # type: ignore[arg-type]


def notice(ref: ObjectRef, reason: str, message: str) -> None:
    with contextlib.suppress(LookupError):  # outside a running operator (unit tests): kopf has no event queue
        kopf.event(kopf.Body(ref.event_body()), type="Normal", reason=reason, message=message)  # type: ignore[arg-type]


def post_transition(ref: ObjectRef, plan: Plan) -> None:
    """One Event per phase change. kopf.event, not kopf.info: the operator posts only warnings by level."""
    message = f"{plan.old_phase or JobPhase.PENDING} -> {plan.phase}: {plan.message}"  # no status yet: Pending
    log.info("LoRAJob %s/%s %s", ref.namespace, ref.name, message,
             extra=_ref_extra((ref.namespace, ref.name), plan.phase))
    obj = kopf.Body(ref.event_body())  # type: ignore[arg-type]
    try:
        if plan.phase == JobPhase.FAILED:
            kopf.warn(obj, reason=plan.phase, message=message)
        else:
            kopf.event(obj, type="Normal", reason=plan.phase, message=message)
    except LookupError:
        pass  # outside a running operator (unit tests): kopf has no event queue
