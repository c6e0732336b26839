"""Pieces every pod the operator builds shares: labels, owner references, security, URIs as volumes/env."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubelora.api.common import Resources
from kubelora.api.meta import ObjectRef
from kubelora.api.uris import ADAPTER_SCHEMES, DEFAULT_PVC_ROOT, S3URI, HfURI, PvcURI, parse_uri

Manifest = dict[str, Any]
APP_LABEL = "app.kubernetes.io/name"
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kubelora-operator"
"""The managed-by value on every child, pods included: the operator's Pod watch selects on it."""
COMPONENT = "app.kubernetes.io/component"
LORAJOB_LABEL = "kubelora.io/lorajob"
DEPLOYMENT_LABEL = "kubelora.io/adapterdeployment"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue's label: a Job carrying it is admitted (unsuspended) by Kueue when its LocalQueue has quota."""


def object_meta(name: str, owner: ObjectRef, labels: Mapping[str, str]) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {PART_OF: "kubelora", MANAGED_BY: MANAGER, **labels},
        "ownerReferences": [owner.owner_reference()],
    }


RUN_AS = 65532
"""UID and GID of every container the operator runs (the images create this user): above 10000, so it maps to
no host account."""
SCRATCH_VOLUME = "scratch"
SCRATCH_DIR = "/home/kubelora"
"""HOME in both images. Root filesystems are read-only, so everything a process writes (caches of huggingface,
torch, triton and vLLM, temporary files, the trainer's downloads and staging) goes to this emptyDir."""


def scratch_volume() -> Manifest:
    return {"name": SCRATCH_VOLUME, "emptyDir": {}}


def scratch_mount(sub_path: str | None = None) -> Manifest:
    """``sub_path`` keeps two containers of one pod out of each other's caches."""
    mount: Manifest = {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR}
    if sub_path:
        mount["subPath"] = sub_path
    return mount


def scratch_env() -> list[Manifest]:
    """HOME and TMPDIR on the scratch volume: /tmp is on the read-only root filesystem."""
    return [{"name": "HOME", "value": SCRATCH_DIR}, {"name": "TMPDIR", "value": SCRATCH_DIR}]


def container_security_context() -> Manifest:
    """Restricted Pod Security Standard: non-root, no privilege escalation, no capabilities; read-only root."""
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Manifest:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def claim_volume_name(claim: str) -> str:
    return "pvc-" + claim.replace(".", "-")[:59]


def pvc_claims(uris: Iterable[str | None]) -> list[str]:
    """Claims the pod must mount, in a stable order, so the pod template does not churn."""
    claims = {parsed.claim for uri in uris if uri for parsed in [parse_uri(uri, ADAPTER_SCHEMES)]
              if isinstance(parsed, PvcURI)}
    return sorted(claims)


def pvc_volumes(claims: Iterable[str], read_only: bool = False) -> tuple[list[Manifest], list[Manifest]]:
    """Volumes and mounts for ``pvc://`` URIs: each claim at /mnt/pvc/<claim> (see docs/design.md)."""
    volumes, mounts = [], []
    for claim in claims:
        name = claim_volume_name(claim)
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": name, "mountPath": f"{DEFAULT_PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


_S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")


def credential_env(uri: str, secret_ref: str | None) -> list[Manifest]:
    """Env vars that carry a Secret's keys to the process; the values never appear in a manifest or log."""
    if not secret_ref:
        return []
    parsed = parse_uri(uri)
    if isinstance(parsed, S3URI):
        keys: tuple[str, ...] = _S3_KEYS
    elif isinstance(parsed, HfURI):
        keys = ("HF_TOKEN",)
    else:
        keys = ("HF_TOKEN", *_S3_KEYS)
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_ref, "key": key, "optional": True}}}
        for key in keys
    ]


def merge_env(*groups: Iterable[Manifest]) -> list[Manifest]:
    """Concatenate env lists; the first definition of a name wins (Kubernetes would keep the last)."""
    seen: set[str] = set()
    out = []
    for group in groups:
        for item in group:
            if item["name"] not in seen:
                seen.add(item["name"])
                out.append(item)
    return out


def container_resources(resources: Resources, base: Mapping[str, str] | None = None) -> Manifest:
    requests = {**(base or {}), **resources.requests}
    limits = dict(resources.limits)
    if "memory" in requests:
        # Memory is not compressible: a container above its request is what the kubelet evicts first, so the
        # request is also the limit unless the spec sets one.
        limits.setdefault("memory", requests["memory"])
    if resources.gpus:
        limits["nvidia.com/gpu"] = str(resources.gpus)
        requests["nvidia.com/gpu"] = str(resources.gpus)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def placement(resources: Resources) -> Manifest:
    """nodeSelector, tolerations and priority class for a pod spec (only the keys that are set)."""
    out: Manifest = {}
    if resources.node_selector:
        out["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        out["tolerations"] = [t.wire() for t in resources.tolerations]
    if resources.priority_class_name:
        out["priorityClassName"] = resources.priority_class_name
    return out


def pod_ip_env() -> list[Manifest]:
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
