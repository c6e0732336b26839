"""AdapterDeployment handlers: thin kopf wiring around :class:`~.adapterdeployment_loop.Supervisor`.

* Startup: server-side label selectors for the two child watches, then one Supervisor (kept in kopf's
  memo) whose background task applies, polls and writes status for every known AdapterDeployment.
* AdapterDeployment events -> the supervisor tracks the body; a new object or a new generation is ticked
  at once. ``kopf.on.event``, not create/update/resume or a timer: no finalizer and no annotations on the
  user's objects (kopf's timers and daemons add a finalizer to every object they run for).
* Serving Deployment and Pod events, and LoRAJob events -> tick the AdapterDeployment they belong to.
* Three indexes keep small views of LoRAJobs, serving pods and Deployments in memory, so a steady state
  costs no API reads.

Deletion needs no handler: every child has a controller ownerReference, so the garbage collector removes it.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubelora.api.common import GROUP, VERSION
from kubelora.handlers import metrics
from kubelora.handlers.adapterdeployment_agents import agent_client
from kubelora.handlers.adapterdeployment_loop import Indexes, Key, Supervisor
from kubelora.handlers.kube import API, apply, patch_status
from kubelora.reconcile.adapterdeployment_refs import JobView, job_view
from kubelora.reconcile.adapterdeployment_views import DeploymentView, PodView, deployment_view, pod_view
from kubelora.resources.pods import DEPLOYMENT_LABEL
from kubelora.resources.serving_common import FIELD_MANAGER

AD = (GROUP, VERSION, "adapterdeployments")
LORAJOBS = (GROUP, VERSION, "lorajobs")
SERVING = {DEPLOYMENT_LABEL: kopf.PRESENT}
MEMO_KEY = "kubelora_adapterdeployments"
"""The one server-side selector of the operator's Pod watch, shared with the LoRAJob pods (selectors on one
resource are ANDed): both kinds' pod templates carry app.kubernetes.io/managed-by=kubelora-operator."""


def _settings() -> Any:
    from kubelora import handlers

    return handlers.SETTINGS


def supervisor(memo: kopf.Memo) -> Supervisor:
    found = memo.get(MEMO_KEY)
    if not isinstance(found, Supervisor):
        raise kopf.TemporaryError("the AdapterDeployment supervisor is not started yet", delay=1)
    return found


@kopf.on.startup()
async def adapterdeployment_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    """kopf passes every index to startup handlers too (empty until the watches fill them)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per agent request otherwise
    settings.watching.label_selectors["apps", "v1", "deployments"] = DEPLOYMENT_LABEL
    options = _settings()
    indexes = Indexes(kwargs["lorajob_views"], kwargs["serving_pods"], kwargs["serving_deployments"])
    sup = Supervisor(indexes,
                     poll_seconds=options.adapter_poll_seconds, image=options.server_image,
                     pull_policy=options.image_pull_policy,
                     apply=lambda manifest: apply(API, manifest, FIELD_MANAGER),
                     patch_status=lambda path, status: patch_status(API, path, status, FIELD_MANAGER),
                     client=agent_client())
    memo[MEMO_KEY] = sup
    sup.start()


@kopf.on.cleanup()
async def adapterdeployment_cleanup(memo: kopf.Memo, **_: Any) -> None:
    found = memo.get(MEMO_KEY)
    if isinstance(found, Supervisor):
        await found.stop()


@kopf.index(*LORAJOBS)
def lorajob_views(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, JobView]:
    return {(namespace or "", name): job_view(body)}


@kopf.index("", "v1", "pods", labels=SERVING)
def serving_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, PodView]:
    return {(namespace or "", labels[DEPLOYMENT_LABEL]): pod_view(body)}


@kopf.index("apps", "v1", "deployments", labels=SERVING)
def serving_deployments(namespace: str | None, name: str, body: kopf.Body, meta: kopf.Meta,
                        **_: Any) -> dict[Key, DeploymentView] | None:
    owners = meta.get("ownerReferences") or []
    if not any(o.get("kind") == "AdapterDeployment" and o.get("name") == name for o in owners):
        return None
    return {(namespace or "", name): deployment_view(body)}


@kopf.on.event(*AD)
async def adapterdeployment_event(type: str | None, body: kopf.Body, namespace: str | None, name: str,
                                  memo: kopf.Memo, **_: Any) -> None:
    key = (namespace or "", name)
    metrics.adapterdeployment_seen(type, body)
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        supervisor(memo).forget(key)
    else:
        supervisor(memo).seen(key, body)


@kopf.on.event("apps", "v1", "deployments", labels=SERVING)
async def serving_deployment_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    supervisor(memo).kick((namespace or "", labels[DEPLOYMENT_LABEL]))


@kopf.on.event("", "v1", "pods", labels=SERVING)
async def serving_pod_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    supervisor(memo).kick((namespace or "", labels[DEPLOYMENT_LABEL]))


@kopf.on.event(*LORAJOBS)
async def lorajob_for_serving(type: str | None, namespace: str | None, name: str, body: kopf.Body,
                              memo: kopf.Memo, **_: Any) -> None:
    """A LoRAJob that publishes, fails or goes away changes what the AdapterDeployments serving from it load."""
    view = job_view(body)
    mark = None if type == "DELETED" else (view.phase, view.adapter)
    if supervisor(memo).note_job((namespace or "", name), mark):
        supervisor(memo).kick_referencing(namespace or "", name)
