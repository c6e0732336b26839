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

Several nodes (``spec.resources.nodes > 1``) train as one Indexed Job: ``completions = parallelism =
nodes``, each pod gets ``JOB_COMPLETION_INDEX`` (its node rank) and the hostname ``<job>-<index>`` from the
Job controller, and ``subdomain`` puts those names in the cluster DNS through a headless Service
(:func:`rendezvous_service`, ``publishNotReadyAddresses``: peers rendezvous before any is Ready). Every
pod's torchrun meets at ``<job>-0.<service>:29400``. Workers never restart on their own, so a lost node
fails its peers' collectives too, every index fails once and the Job starts the whole group again
(``backoffLimitPerIndex``, ``maxFailedIndexes: 0``: an index out of retries fails the Job at once instead
of leaving the others to hang), and the new group resumes from the newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kubelora.api.common import Resources
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import EXIT_BAD_INPUT, EXIT_STOPPED, TRAINER_CONFIG_PATH
from kubelora.api.uris import FileURI, PvcURI, parse_uri
from kubelora.resources.lorajob_names import (
    BATCH_JOB_NAME_LABEL,
    CONTAINER_NAME,
    NAME_ANNOTATION,
    PREFLIGHT_COMPONENT,
    RENDEZVOUS_COMPONENT,
    TRAINER_COMPONENT,
    child_labels,
    rendezvous_service_name,
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
    scratch_env,
    scratch_mount,
    scratch_volume,
)
from kubelora.settings import Settings

TRAIN_COMMAND = ("kubelora-train", "--config", TRAINER_CONFIG_PATH)
VALIDATE_FLAG = "--validate-only"
PROGRESS_ENV = "KUBELORA_PROGRESS_INTERVAL"
CONFIG_VOLUME = "trainer-config"
CONFIG_DIR = TRAINER_CONFIG_PATH.rsplit("/", 1)[0]
PREFLIGHT_REQUESTS = {"cpu": "500m", "memory": "1Gi"}
PREFLIGHT_LIMITS = {"memory": "4Gi"}
RDZV_PORT = 29400
"""torchrun's c10d rendezvous on node 0 (kubelora_trainer.distributed.RDZV_PORT)."""
RDZV_ENDPOINT_ENV = "KUBELORA_RDZV_ENDPOINT"
RDZV_ID_ENV = "KUBELORA_RDZV_ID"


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


def _input_uris(spec: LoRAJobSpec, inputs: Sequence[str] = ()) -> list[str | None]:
    data = [spec.dataset.uri, spec.dataset.eval_uri] if spec.dataset is not None else []
    return [spec.base_model.uri, *data, *inputs]


def _volumes(job: ObjectRef, revision: int, spec: LoRAJobSpec, gpus: int, inputs: Sequence[str] = ()) -> tuple[
        list[Manifest], list[Manifest]]:
    """Config at /etc/kubelora, scratch at HOME, input claims read-only, the output claim read-write, /dev/shm for
    GPUs."""
    config = trainer_config_name(job.name, revision)
    volumes: list[Manifest] = [{"name": CONFIG_VOLUME, "configMap": {"name": config}}, scratch_volume()]
    mounts: list[Manifest] = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}, scratch_mount()]
    out_claims = pvc_claims([spec.output.uri])
    in_claims = [c for c in pvc_claims(_input_uris(spec, inputs)) if c not in out_claims]
    for claims, read_only in ((in_claims, True), (out_claims, False)):
        vols, mnts = pvc_volumes(claims, read_only=read_only)
        volumes += vols
        mounts += mnts
    if gpus:
        # NCCL and DataLoader workers need more shared memory than the container runtime's 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _credentials(spec: LoRAJobSpec, inputs: Sequence[str] = ()) -> list[Manifest]:
    """Secret keys as env (values never appear here); the first URI that names a key wins.

    pvc:// and file:// need no credentials, so a Secret named beside them adds nothing (it would
    otherwise shadow the AWS_* keys of an s3:// URI listed later).
    """
    data = spec.dataset
    pairs = [(spec.base_model.uri, spec.base_model.credentials_secret_ref),
             *([(data.uri, data.credentials_secret_ref), (data.eval_uri, data.credentials_secret_ref)] if data else []),
             (spec.output.uri, spec.output.credentials_secret_ref),
             # Combined adapters live where adapters are published: the output's Secret reads them.
             *((uri, spec.output.credentials_secret_ref) for uri in inputs)]
    return merge_env(*(credential_env(uri, secret) for uri, secret in pairs
                       if uri and not isinstance(parse_uri(uri), PvcURI | FileURI)))


def _pod_template(job: ObjectRef, revision: int, spec: LoRAJobSpec, settings: Settings, *,
                  component: str, command: list[str], resources: Resources, base_requests: Mapping[str, str],
                  service_account: str | None, rendezvous: tuple[str, str] | None = None,
                  inputs: Sequence[str] = ()) -> Manifest:
    """``rendezvous``: (training Job name, Service name) of a multi-node run; ``inputs``: resolved URIs of
    spec.combine's adapters (mounted like the other inputs)."""
    name = job.name
    volumes, mounts = _volumes(job, revision, spec, resources.gpus, inputs)
    rdzv_env: list[Manifest] = []
    if rendezvous is not None:
        job_name, service = rendezvous
        rdzv_env = [{"name": RDZV_ENDPOINT_ENV, "value": f"{job_name}-0.{service}:{RDZV_PORT}"},
                    {"name": RDZV_ID_ENV, "value": job_name}]
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": trainer_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": merge_env(
            [{"name": PROGRESS_ENV, "value": f"{settings.progress_interval_seconds:g}"}],
            pod_ip_env(),
            scratch_env(),
            rdzv_env,
            _credentials(spec, inputs),
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
    if rendezvous is not None:
        pod["subdomain"] = rendezvous[1]
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    labels = {PART_OF: "kubelora", MANAGED_BY: MANAGER, **child_labels(name, component, revision)}
    return {"metadata": {"labels": labels, "annotations": {NAME_ANNOTATION: name}}, "spec": pod}


def _job(owner: ObjectRef, job_name: str, component: str, revision: int, template: Manifest, *,
         backoff_limit: int, deadline: int, queue: str | None = None, suspend: bool = False,
         nodes: int = 1) -> Manifest:
    labels = child_labels(owner.name, component, revision)
    if queue:
        labels[QUEUE_LABEL] = queue
    spec: Manifest = {
        "backoffLimit": backoff_limit,
        "activeDeadlineSeconds": deadline,
        "completions": nodes,
        "parallelism": nodes,
        "suspend": bool(queue) or suspend,
        "podFailurePolicy": pod_failure_policy(),
        "podReplacementPolicy": "Failed",
        "template": template,
    }
    if nodes > 1:
        # A lost node fails every index once (its peers' collectives break), so the group restarts as a
        # whole; each index has its own retries and one out of them fails the Job instead of hanging it.
        del spec["backoffLimit"]
        spec.update(completionMode="Indexed", backoffLimitPerIndex=backoff_limit, maxFailedIndexes=0)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(job_name, owner, labels),
        "spec": spec,
    }


def training_job(job: ObjectRef, spec: LoRAJobSpec, revision: int, generation: int,
                 settings: Settings, inputs: Sequence[str] = ()) -> Manifest:
    """Job ``<job>-train-<generation>``: trains ``revision`` (whose config is already in its ConfigMap)."""
    name = job.name
    job_name = training_job_name(name, generation)
    nodes = spec.resources.nodes
    rendezvous = (job_name, rendezvous_service_name(name, generation)) if nodes > 1 else None
    template = _pod_template(job, revision, spec, settings, component=TRAINER_COMPONENT,
                             command=list(TRAIN_COMMAND), resources=spec.resources, base_requests={},
                             service_account=trainer_identity_name(name), rendezvous=rendezvous, inputs=inputs)
    return _job(job, job_name, TRAINER_COMPONENT, revision, template,
                backoff_limit=spec.backoff_limit, deadline=spec.active_deadline_seconds, queue=spec.queue_name,
                suspend=spec.suspend, nodes=nodes)


def rendezvous_service(job: ObjectRef, revision: int, generation: int) -> Manifest:
    """Headless Service ``<job>-train-<generation>`` naming the pods of a multi-node training Job in DNS.

    ``publishNotReadyAddresses``: the trainer pods have no readiness probe and must find node 0 while
    they start. Owned by the LoRAJob like every other child (garbage-collected with it).
    """
    name = job.name
    service = rendezvous_service_name(name, generation)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(service, job, child_labels(name, RENDEZVOUS_COMPONENT, revision)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {BATCH_JOB_NAME_LABEL: training_job_name(name, generation)},
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


def validation_job(job: ObjectRef, spec: LoRAJobSpec, revision: int, settings: Settings,
                   inputs: Sequence[str] = ()) -> Manifest:
    """Job ``<job>-validate-<revision>``: reads the dataset and base model, no GPU, never retried."""
    name = job.name
    resources = spec.resources.model_copy(update={"gpus": 0, "requests": {}, "limits": dict(PREFLIGHT_LIMITS)})
    template = _pod_template(job, revision, spec, settings, component=PREFLIGHT_COMPONENT,
                             command=[*TRAIN_COMMAND, VALIDATE_FLAG], resources=resources,
                             base_requests=PREFLIGHT_REQUESTS, service_account=None, inputs=inputs)
    return _job(job, validation_job_name(name, revision), PREFLIGHT_COMPONENT, revision, template,
                backoff_limit=0, deadline=spec.active_deadline_seconds)
