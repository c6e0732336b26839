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
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import kopf

from kubelora.api.common import now_rfc3339
from kubelora.api.reasons import JobPhase
from kubelora.api.runtime import TrainerRunConfig
from kubelora.handlers.lorajob_client import MERGE_PATCH, Api, ApiError, path
from kubelora.reconcile.lorajob import Plan, reconcile
from kubelora.reconcile.lorajob_actions import Action, Create
from kubelora.reconcile.lorajob_observed import Observed, job_state, pod_state
from kubelora.reconcile.lorajob_status import TERMINAL
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


def _delay(status: int, attempt: int) -> float:
    """Back off longer for errors a retry cannot fix quickly (RBAC, invalid manifests)."""
    base = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
    return max(base, 30.0) if status in (403, 422) else base


class Reconciler:
    def __init__(self, api: Api, settings: Settings) -> None:
        self.api = api
        self.settings = settings
        self._locks: dict[Key, asyncio.Lock] = {}
        self._pending: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._configs: dict[tuple[str, int], TrainerRunConfig] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error: ApiError | None = None

    async def kick(self, key: Key, observe: Observer) -> None:
        """Reconcile; coalesced per object, and retried here with backoff since kopf does not retry events."""
        if key in self._pending:
            return
        self._pending.add(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            self._pending.discard(key)
            try:
                await self._reconcile(key, observe)
            except ApiError as exc:
                attempt = self._failures.get(key, 0)
                self._failures[key] = attempt + 1
                delay = _delay(exc.status, attempt)
                log.warning("reconcile of %s/%s failed (%s); retrying in %.0f s", *key, exc, delay)
                self.last_error = exc
                task = asyncio.create_task(self._later(key, observe, delay))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._failures.pop(key, None)

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
            observed = await self._fill_gaps(body, observe(name))
            plan = reconcile(body, observed, await self._run_config(body), self.settings, now_rfc3339())
            if not await self._apply(body, plan):
                return
            if not plan.requeue:
                return

    def _forget(self, key: Key) -> None:
        self._locks.pop(key, None)
        self._failures.pop(key, None)

    async def _fill_gaps(self, body: Mapping[str, Any], observed: Observed) -> Observed:
        """Read directly what the index may not show yet: Jobs named in the status, pods of finished Jobs."""
        status = body.get("status") or {}
        if status.get("phase") in TERMINAL:
            return observed
        namespace = body["metadata"]["namespace"]
        jobs, pods = list(observed.jobs), list(observed.pods)
        for name in {status.get("jobName"), status.get("validationJobName")} - {None}:
            if observed.job(name) is None:
                try:
                    jobs.append(job_state(await self.api.request("GET", path("batch/v1", "Job", namespace, name))))
                except ApiError as exc:
                    if exc.status != 404:
                        raise
        for job in jobs:
            if job.finished and not any(p.termination for p in observed.pods_of(job.name)):
                listed = await self.api.request("GET", path("v1", "Pod", namespace),
                                                params={"labelSelector": f"{JOB_NAME_LABEL}={job.name}"})
                pods = [p for p in pods if p.job_name != job.name] + [pod_state(p) for p in listed.get("items", [])]
        return replace(observed, jobs=tuple(jobs), pods=tuple(pods))

    async def _run_config(self, body: Mapping[str, Any]) -> TrainerRunConfig | None:
        """The frozen spec of the current revision; only needed once the spec moved on from it."""
        meta = body["metadata"]
        revision = (body.get("status") or {}).get("revision")
        if not isinstance(revision, int) or revision == meta.get("generation"):
            return None
        cache_key = (str(meta.get("uid")), revision)
        if cache_key not in self._configs:
            try:
                config_map = await self.api.request(
                    "GET", path("v1", "ConfigMap", meta["namespace"], trainer_config_name(meta["name"], revision)))
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
        if isinstance(action, Create):
            manifest = action.manifest
            try:
                await self.api.request("POST", path(manifest["apiVersion"], manifest["kind"], namespace), manifest)
                log.info("created %s %s/%s", action.kind, namespace, action.name)
            except ApiError as exc:
                if exc.status != 409:  # made by an earlier reconcile whose status patch was lost
                    raise
            return
        try:
            await self.api.request("DELETE", path(action.api_version, action.kind, namespace, action.name),
                                   {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
            log.info("deleted %s %s/%s", action.kind, namespace, action.name)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _apply(self, body: Mapping[str, Any], plan: Plan) -> bool:
        """Act, then patch the status; False when the LoRAJob is gone."""
        meta = body["metadata"]
        for action in plan.actions:
            await self._act(meta["namespace"], action)
        if plan.patch:
            try:
                await self.api.request("PATCH", path(LORAJOB_API, "LoRAJob", meta["namespace"], meta["name"], "status"),
                                       {"status": plan.patch}, content_type=MERGE_PATCH)
            except ApiError as exc:
                if exc.status == 404:
                    return False
                raise
        if plan.transitioned:
            post_transition(body, plan)
        return True


def post_transition(body: Mapping[str, Any], plan: Plan) -> None:
    """One Event per phase change. kopf.event, not kopf.info: the operator posts only warnings by level."""
    message = f"{plan.old_phase or 'New'} -> {plan.phase}: {plan.message}"
    log.info("LoRAJob %s/%s %s", body["metadata"]["namespace"], body["metadata"]["name"], message)
    obj = kopf.Body(dict(body))  # type: ignore[arg-type]
    try:
        if plan.phase == JobPhase.FAILED:
            kopf.warn(obj, reason=plan.phase, message=message)
        else:
            kopf.event(obj, type="Normal", reason=plan.phase, message=message)
    except LookupError:
        pass  # outside a running operator (unit tests): kopf has no event queue
