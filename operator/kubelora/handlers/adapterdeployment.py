"""AdapterDeployment handlers: apply the children, then keep the status in step with the agents.

Flow: create/update/resume -> resolve adapters (LoRAJob index) -> build children (pure) -> server-side apply.
A timer per object, every ``adapter_poll_seconds``, resolves again (so a LoRAJob that publishes a new
adapter rolls it forward through the ConfigMap), applies only children that changed, asks each serving
pod's agent for its adapters and patches ``status`` only when the aggregate differs (itself, not through
kopf's ``patch``, so that a refused write is retried on the next tick instead of ending the timer).
Pods, Deployments and LoRAJobs come from kopf indexes (watch streams held in memory), so a steady state
costs no API calls.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TypeVar

import kopf
from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus, AdapterStatus
from kubelora.api.common import GROUP, VERSION, now_rfc3339
from kubelora.api.reasons import DeploymentPhase, Reason
from kubelora.handlers.adapterdeployment_agents import poll_agents
from kubelora.handlers.adapterdeployment_children import APPLIED_KEY, apply_children, build_children, changed
from kubelora.handlers.adapterdeployment_kube import APPLIER, ApplyError
from kubelora.reconcile.adapterdeployment_refs import (
    JobView,
    ResolvedAdapter,
    job_view,
    referenced_jobs,
    resolve_adapters,
)
from kubelora.reconcile.adapterdeployment_spec import parse_spec, status_patch
from kubelora.reconcile.adapterdeployment_status import Observed, aggregate_status
from kubelora.reconcile.adapterdeployment_views import (
    DeploymentView,
    PodView,
    ReplicaReport,
    deployment_view,
    pod_view,
)
from kubelora.resources.pods import DEPLOYMENT_LABEL
from kubelora.resources.serving_common import endpoint
from kubelora.resources.serving_engine import ServingSpecError
from kubelora.settings import Settings

AD = (GROUP, VERSION, "adapterdeployments")
LORAJOBS = (GROUP, VERSION, "lorajobs")
Key = tuple[str, str]
V = TypeVar("V")


def _settings() -> Settings:
    from kubelora import handlers

    return handlers.SETTINGS


class _QuietTicks(logging.Filter):
    """Drop kopf's "Timer 'observe' succeeded." line: at one per object per poll it would drown the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'observe' succeeded")


@kopf.on.startup()
def _quiet_polling(**_: Any) -> None:
    logging.getLogger("kopf.objects").addFilter(_QuietTicks())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per agent request otherwise


def _poll_seconds() -> float:
    """kopf fixes a timer's interval when the module is imported, before ``configure()`` runs; the value
    comes from KUBELORA_ADAPTER_POLL_SECONDS, which is also the only source ``configure()`` gets it from."""
    return Settings.from_env().adapter_poll_seconds


@kopf.index(*LORAJOBS)
def lorajob_views(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, JobView]:
    return {(namespace or "", name): job_view(body)}


@kopf.index("pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def serving_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, PodView]:
    return {(namespace or "", labels[DEPLOYMENT_LABEL]): pod_view(body)}


@kopf.index("apps", "v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def serving_deployments(namespace: str | None, name: str, body: kopf.Body, meta: kopf.Meta,
                        **_: Any) -> dict[Key, DeploymentView] | None:
    owners = meta.get("ownerReferences") or []
    if not any(o.get("kind") == "AdapterDeployment" and o.get("name") == name for o in owners):
        return None
    return {(namespace or "", name): deployment_view(body)}


def _values(index: kopf.Index[Key, V] | None, key: Key) -> list[V]:
    """The values an index holds under ``key`` (several objects may map to one key)."""
    return list(index.get(key, [])) if index is not None else []


def _jobs(index: kopf.Index[Key, JobView] | None, namespace: str | None,
          spec: AdapterDeploymentSpec) -> dict[str, JobView]:
    out: dict[str, JobView] = {}
    for job in referenced_jobs(spec):
        for view in _values(index, (namespace or "", job)):
            out[job] = view
    return out


def _first(index: kopf.Index[Key, DeploymentView] | None, key: Key) -> DeploymentView | None:
    return next(iter(_values(index, key)), None)


def _previous(body: Mapping[str, Any]) -> AdapterDeploymentStatus | None:
    try:
        return AdapterDeploymentStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


def _served(body: kopf.Body) -> list[AdapterStatus]:
    previous = _previous(body)
    return previous.adapters if previous is not None else []


def _status_diff(body: kopf.Body, new: AdapterDeploymentStatus, logger: kopf.Logger) -> dict[str, Any] | None:
    """The status patch to send (None: nothing changed); announces phase changes as Events."""
    diff = status_patch(body.get("status"), new)
    before = (body.get("status") or {}).get("phase")
    if diff is not None and before != new.phase:
        level = kopf.warn if new.phase in (DeploymentPhase.DEGRADED, DeploymentPhase.FAILED) else kopf.info
        degraded = next((c.message for c in new.conditions if c.type == "Degraded" and c.status == "True"), "")
        level(body, reason=f"Phase{new.phase}", message=degraded or f"phase {before or 'none'} -> {new.phase}")
        logger.info("phase %s -> %s", before, new.phase)
    return diff


def _send_status(body: kopf.Body, diff: dict[str, Any], logger: kopf.Logger) -> None:
    meta = body["metadata"]
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{meta['namespace']}/adapterdeployments/{meta['name']}"
    try:
        APPLIER.patch_status(path, diff)
    except ApplyError as exc:  # retried on the next tick
        logger.warning("status not written: %s", exc)


def _observed(body: Mapping[str, Any], spec: AdapterDeploymentSpec | None, invalid: str | None,
              resolved: list[ResolvedAdapter], **kw: Any) -> Observed:
    raw_spec = body.get("spec") or {}
    port = spec.service.port if spec else int((raw_spec.get("service") or {}).get("port") or 8000)
    return Observed(
        generation=int(body["metadata"].get("generation") or 0),
        desired_replicas=spec.replicas if spec else int(raw_spec.get("replicas") or 0),
        endpoint=endpoint(body, port),
        desired_adapters=len(raw_spec.get("adapters") or []),
        resolved=resolved,
        invalid=invalid,
        **kw,
    )


@kopf.on.resume(*AD)
@kopf.on.create(*AD)
@kopf.on.update(*AD, field="spec")
def serve(body: kopf.Body, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger,
          lorajob_views: kopf.Index[Key, JobView] | None = None, **_: Any) -> None:
    """Apply every child. An unservable spec ends Failed (InvalidSpec) without retries."""
    spec, invalid = parse_spec(body)
    resolved: list[ResolvedAdapter] = []
    if spec is not None:
        resolved = resolve_adapters(spec, _jobs(lorajob_views, namespace, spec), _served(body))
        settings = _settings()
        try:
            children = build_children(body, spec, resolved, image=spec.vllm.image or settings.server_image,
                                      pull_policy=settings.image_pull_policy)
        except ServingSpecError as exc:
            invalid = str(exc)
        else:
            try:
                apply_children(children, memo, APPLIER.apply)
            except ApplyError as exc:
                raise kopf.TemporaryError(str(exc), delay=30 if exc.status == 403 else 5) from None
    if invalid is not None:
        kopf.warn(body, reason=Reason.INVALID_SPEC, message=invalid)
        new = aggregate_status(_observed(body, None, invalid, []), _previous(body), now_rfc3339())
        diff = _status_diff(body, new, logger)
        if diff is not None:
            _send_status(body, diff, logger)


INPUTS_KEY = "kubelora_inputs"
"""memo key: what the children were last built from, so an unchanged object costs no rebuild per poll."""
RESYNC_KEY = "kubelora_resync_at"
RESYNC_SECONDS = 600.0
"""Re-apply every child this often (no-op server-side applies write nothing), which repairs a child that
was deleted or edited by hand; a missing Deployment is noticed at once through the index."""


def _forget_applied(memo: MutableMapping[str, Any], deployment_missing: bool) -> None:
    now = time.monotonic()
    if deployment_missing or now >= memo.get(RESYNC_KEY, 0.0):
        memo.pop(INPUTS_KEY, None)
        memo.pop(APPLIED_KEY, None)
        memo[RESYNC_KEY] = now + RESYNC_SECONDS


async def _sync_changed(body: kopf.Body, spec: AdapterDeploymentSpec, resolved: list[ResolvedAdapter],
                        memo: MutableMapping[str, Any], logger: kopf.Logger) -> str | None:
    """Apply the children that changed since the last apply; returns an InvalidSpec message, if any."""
    settings = _settings()
    image = spec.vllm.image or settings.server_image
    inputs = copy.deepcopy((body["metadata"].get("uid"), body["metadata"].get("labels"), body.get("spec"),
                            tuple(resolved), image, settings.image_pull_policy))
    if memo.get(INPUTS_KEY) == inputs:
        return None
    try:
        children = build_children(body, spec, resolved, image=image, pull_policy=settings.image_pull_policy)
    except ServingSpecError as exc:
        return str(exc)
    todo = changed(children, memo)
    if todo:
        try:
            applied = await asyncio.to_thread(apply_children, todo, memo, APPLIER.apply)
            logger.info("applied %s", ", ".join(applied))
        except ApplyError as exc:  # the next tick retries; the handlers' retries report it too
            logger.warning("%s", exc)
            return None
    memo[INPUTS_KEY] = inputs
    return None


@kopf.timer(*AD, interval=_poll_seconds(), id="observe")
async def observe(body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo,
                  logger: kopf.Logger, lorajob_views: kopf.Index[Key, JobView] | None = None,
                  serving_pods: kopf.Index[Key, PodView] | None = None,
                  serving_deployments: kopf.Index[Key, DeploymentView] | None = None, **_: Any) -> None:
    """Resolve, apply what changed, poll the agents, and patch the status only if it differs."""
    key = (namespace or "", name)
    spec, invalid = parse_spec(body)
    resolved: list[ResolvedAdapter] = []
    reports: list[ReplicaReport] = []
    if spec is not None:
        resolved = resolve_adapters(spec, _jobs(lorajob_views, namespace, spec), _served(body))
        _forget_applied(memo, deployment_missing=_first(serving_deployments, key) is None)
        invalid = await _sync_changed(body, spec, resolved, memo, logger)
        if invalid is None:
            reports = await poll_agents(_values(serving_pods, key))
    obs = _observed(body, spec, invalid, resolved if invalid is None else [],
                    deployment=_first(serving_deployments, key), replicas=reports)
    diff = _status_diff(body, aggregate_status(obs, _previous(body), now_rfc3339()), logger)
    if diff is not None:
        await asyncio.to_thread(_send_status, body, diff, logger)
