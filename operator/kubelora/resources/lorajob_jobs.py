"""The two batch/v1 Jobs of a LoRAJob run: the pre-flight check and the training itself.

Both run the trainer image with an explicit console-script command (the local pod runner executes
it from the virtualenv) and read the same immutable run config. They differ in what they may use:

* pre-flight ``<job>-validate-<revision>``: ``--validate-only``, no GPU, small CPU/memory requests,
  no API token, ``backoffLimit: 0`` (a bad dataset stays bad; retrying only delays the message);
* training ``<job>-train-<generation>``: GPUs, placement, the trainer ServiceAccount (it patches
  ``status.progress``), ``backoffLimit``/``activeDeadlineSeconds`` from the spec. Retried pods resume
  from the newest checkpoint because the output layout is keyed by revision, not by pod.

Both use ``FallbackToLogsOnError`` so a trainer that dies before writing its TrainerResult still
leaves its last log lines in the pod status for the operator to report, and the same Job failure
policy (:func:`pod_failure_policy`): bad input fails the Job at once, a disruption (eviction,
preemption, node drain) or a graceful stop with a checkpoint saved is not a failure, and a
replacement pod starts only once the old one has fully stopped (``podReplacementPolicy: Failed``),
so two trainers never write the same checkpoint directory.

With ``spec.queueName`` the training Job carries Kueue's queue label and is created suspended:
Kueue unsuspends it when its ClusterQueue has quota.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubelora.api.common import Resources
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import EXIT_BAD_INPUT, EXIT_STOPPED, TRAINER_CONFIG_PATH
from kubelora.api.uris import FileURI, PvcURI, parse_uri
from kubelora.resources.lorajob_names import (
    CONTAINER_NAME,
    NAME_ANNOTATION,
    PREFLIGHT_COMPONENT,
    TRAINER_COMPONENT,
    child_labels,
    trainer_config_name,
    trainer_identity_name,
    training_job_name,
    validation_job_name,
)
from kubelora.resources.pods import (
    MANAGED_BY,
    MANAGER,
    PART_OF,
    QUEUE_LABEL,
    Manifest,
    container_resources,
    container_security_context,
    credential_env,
    merge_env,
    object_meta,
    placement,
    pod_ip_env,
    pod_security_context,
    pvc_claims,
    pvc_volumes,
)
from kubelora.settings import Settings

TRAIN_COMMAND = ("kubelora-train", "--config", TRAINER_CONFIG_PATH)
VALIDATE_FLAG = "--validate-only"
PROGRESS_ENV = "KUBELORA_PROGRESS_INTERVAL"
CONFIG_VOLUME = "trainer-config"
CONFIG_DIR = TRAINER_CONFIG_PATH.rsplit("/", 1)[0]
PREFLIGHT_REQUESTS = {"cpu": "500m", "memory": "1Gi"}
PREFLIGHT_LIMITS = {"memory": "4Gi"}


def pod_failure_policy() -> Manifest:
    """Exit 2 (bad input) fails the Job now; disruptions and graceful stops (exit 143) do not count."""
    return {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_BAD_INPUT]}},
            {"action": "Ignore",
             "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_STOPPED]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def trainer_image(spec: LoRAJobSpec, settings: Settings) -> str:
    return spec.image or settings.trainer_image


def _input_uris(spec: LoRAJobSpec) -> list[str | None]:
    return [spec.base_model.uri, spec.dataset.uri, spec.dataset.eval_uri]


def _volumes(job: ObjectRef, revision: int, spec: LoRAJobSpec, gpus: int) -> tuple[
        list[Manifest], list[Manifest]]:
    """Config at /etc/kubelora, input claims read-only, the output claim read-write, /dev/shm for GPUs."""
    config = trainer_config_name(job.name, revision)
    volumes: list[Manifest] = [{"name": CONFIG_VOLUME, "configMap": {"name": config}}]
    mounts: list[Manifest] = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}]
    out_claims = pvc_claims([spec.output.uri])
    in_claims = [c for c in pvc_claims(_input_uris(spec)) if c not in out_claims]
    for claims, read_only in ((in_claims, True), (out_claims, False)):
        vols, mnts = pvc_volumes(claims, read_only=read_only)
        volumes += vols
        mounts += mnts
    if gpus:
        # NCCL and DataLoader workers need more shared memory than the container runtime's 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _credentials(spec: LoRAJobSpec) -> list[Manifest]:
    """Secret keys as env (values never appear here); the first URI that names a key wins.

    pvc:// and file:// need no credentials, so a Secret named beside them adds nothing (it would
    otherwise shadow the AWS_* keys of an s3:// URI listed later).
    """
    pairs = [(spec.base_model.uri, spec.base_model.credentials_secret_ref),
             (spec.dataset.uri, spec.dataset.credentials_secret_ref),
             (spec.dataset.eval_uri, spec.dataset.credentials_secret_ref),
             (spec.output.uri, spec.output.credentials_secret_ref)]
    return merge_env(*(credential_env(uri, secret) for uri, secret in pairs
                       if uri and not isinstance(parse_uri(uri), PvcURI | FileURI)))


def _pod_template(job: ObjectRef, revision: int, spec: LoRAJobSpec, settings: Settings, *,
                  component: str, command: list[str], resources: Resources, base_requests: Mapping[str, str],
                  service_account: str | None) -> Manifest:
    name = job.name
    volumes, mounts = _volumes(job, revision, spec, resources.gpus)
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": merge_env(
            [{"name": PROGRESS_ENV, "value": f"{settings.progress_interval_seconds:g}"}],
            pod_ip_env(),
            _credentials(spec),
        ),
        "resources": container_resources(resources, base_requests),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: Manifest = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": service_account is not None,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        **placement(resources),
    }
    if service_account is not None:
        pod["serviceAccountName"] = service_account
    labels = {PART_OF: "kubelora", MANAGED_BY: MANAGER, **child_labels(name, component, revision)}
    return {"metadata": {"labels": labels, "annotations": {NAME_ANNOTATION: name}}, "spec": pod}


def _job(owner: ObjectRef, job_name: str, component: str, revision: int, template: Manifest, *,
         backoff_limit: int, deadline: int, queue: str | None = None, suspend: bool = False) -> Manifest:
    labels = child_labels(owner.name, component, revision)
    if queue:
        labels[QUEUE_LABEL] = queue
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(job_name, owner, labels),
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": deadline,
            "completions": 1,
            "parallelism": 1,
            "suspend": bool(queue) or suspend,
            "podFailurePolicy": pod_failure_policy(),
            "podReplacementPolicy": "Failed",
            "template": template,
        },
    }


def training_job(job: ObjectRef, spec: LoRAJobSpec, revision: int, generation: int,
                 settings: Settings) -> Manifest:
    """Job ``<job>-train-<generation>``: trains ``revision`` (whose config is already in its ConfigMap)."""
    name = job.name
    template = _pod_template(job, revision, spec, settings, component=TRAINER_COMPONENT,
                             command=list(TRAIN_COMMAND), resources=spec.resources, base_requests={},
                             service_account=trainer_identity_name(name))
    return _job(job, training_job_name(name, generation), TRAINER_COMPONENT, revision, template,
                backoff_limit=spec.backoff_limit, deadline=spec.active_deadline_seconds, queue=spec.queue_name,
                suspend=spec.suspend)


def validation_job(job: ObjectRef, spec: LoRAJobSpec, revision: int, settings: Settings) -> Manifest:
    """Job ``<job>-validate-<revision>``: reads the dataset and base model, no GPU, never retried."""
    name = job.name
    resources = spec.resources.model_copy(update={"gpus": 0, "requests": {}, "limits": dict(PREFLIGHT_LIMITS)})
    template = _pod_template(job, revision, spec, settings, component=PREFLIGHT_COMPONENT,
                             command=[*TRAIN_COMMAND, VALIDATE_FLAG], resources=resources,
                             base_requests=PREFLIGHT_REQUESTS, service_account=None)
    return _job(job, validation_job_name(name, revision), PREFLIGHT_COMPONENT, revision, template,
                backoff_limit=0, deadline=spec.active_deadline_seconds)
