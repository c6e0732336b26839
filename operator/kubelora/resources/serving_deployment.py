"""Deployment ``<ad>``: the engine container plus the adapter agent sidecar.

The pod template is built only from inputs that must restart pods (image, engine flags, base model,
resources, placement, the claims to mount). The adapter list is deliberately absent: it reaches the pods
through the ConfigMap the agent watches, so adding, removing or rolling an adapter forward never changes
the template and never restarts a pod. The template hash annotation makes that property visible and
testable. The one exception is a ``pvc://`` adapter on a claim no pod mounts yet: a running pod cannot
gain a volume, so the new claim is a template input.

Replicas: ``spec.replicas`` of the Deployment always follows ``spec.replicas`` of the AdapterDeployment,
whose scale subresource is what an HPA or KEDA writes. The autoscaler targets the AdapterDeployment, never
the Deployment, so the operator stays the Deployment's only writer of replicas and server-side apply has
nothing to fight over. GPU pods roll with maxSurge 0 / maxUnavailable 1 (a rollout needs no spare GPU);
CPU pods with maxSurge 1 / maxUnavailable 0 (no gap). A PodDisruptionBudget (maxUnavailable 1) keeps a
node drain from taking more than one replica at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.common import Resources
from kubelora.api.meta import ObjectRef
from kubelora.api.runtime import ADAPTER_CACHE_DIR
from kubelora.resources.pods import (
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
from kubelora.resources.serving_common import (
    AGENT_CONTAINER,
    AGENT_PORT,
    ENGINE_CONTAINER,
    ENGINE_PORT,
    TEMPLATE_HASH_ANNOTATION,
    agent_account_name,
    configmap_name,
    pdb_name,
    selector_labels,
    server_labels,
)
from kubelora.resources.serving_engine import engine_command

CACHE_VOLUME = "adapter-cache"
HF_CACHE_VOLUME = "hf-cache"
HF_CACHE_DIR = "/var/cache/kubelora/hf"
SHM_VOLUME = "dshm"
AGENT_REQUESTS = {"cpu": "50m", "memory": "128Mi"}
AGENT_LIMITS = {"memory": "512Mi"}
"""The agent holds a desired list and one fetch at a time (streamed to disk): this is far above what it uses."""


def _http_probe(path: str, port: str, period: int, failures: int, timeout: int = 5) -> Manifest:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": timeout}


def engine_probes(engine: str) -> Manifest:
    """vLLM may download and load a large model before /health answers: the startup probe allows 30 min
    (CPU engine: 10 min) so that liveness never kills a pod that is still loading."""
    startup = _http_probe("/health", "http", 10, 180) if engine == "vllm" else _http_probe("/health", "http", 2, 300)
    return {
        "startupProbe": startup,
        "readinessProbe": _http_probe("/health", "http", 5, 3),
        "livenessProbe": _http_probe("/health", "http", 10, 6),
    }


def engine_env(spec: AdapterDeploymentSpec) -> list[Manifest]:
    base = spec.base_model
    return merge_env(
        pod_ip_env(),
        scratch_env(),
        [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
         {"name": "HF_HOME", "value": HF_CACHE_DIR}],
        credential_env(base.uri, base.credentials_secret_ref),
    )


OCI_KEYS = ("OCI_USERNAME", "OCI_PASSWORD")
"""Registry credentials for oci:// adapters (the agent's token handshake), optional keys of the same Secret."""


def agent_env(spec: AdapterDeploymentSpec) -> list[Manifest]:
    """The agent fetches adapters; it gets every credential key of the base model's Secret (all optional),
    because a per-adapter Secret would make the adapter list a template input."""
    secret = spec.base_model.credentials_secret_ref
    registry = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
                for key in OCI_KEYS] if secret else []
    return merge_env(pod_ip_env(), scratch_env(), credential_env("file:///", secret), registry)


def _cache_mounts(read_only: bool) -> list[Manifest]:
    return [{"name": CACHE_VOLUME, "mountPath": ADAPTER_CACHE_DIR, "readOnly": read_only}]


def engine_container(spec: AdapterDeploymentSpec, image: str, pull_policy: str,
                     claim_mounts: list[Manifest]) -> Manifest:
    mounts = [*_cache_mounts(read_only=True), {"name": HF_CACHE_VOLUME, "mountPath": HF_CACHE_DIR},
              scratch_mount(ENGINE_CONTAINER), *claim_mounts]
    if spec.engine == "vllm":
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    resources = spec.resources if spec.engine == "vllm" else spec.resources.model_copy(update={"gpus": 0})
    return {
        "name": ENGINE_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": engine_command(spec),
        "env": engine_env(spec),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "resources": container_resources(resources),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        **engine_probes(spec.engine),
    }


def agent_container(ad_name: str, spec: AdapterDeploymentSpec, image: str, pull_policy: str,
                    claim_mounts: list[Manifest]) -> Manifest:
    """Ready only when every desired adapter is loaded (or permanently failed): that makes the pod Ready."""
    return {
        "name": AGENT_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["kubelora-agent", "--configmap", configmap_name(ad_name),
                    "--engine-url", f"http://$(POD_IP):{ENGINE_PORT}", "--host", "$(POD_IP)",
                    "--port", str(AGENT_PORT), "--cache-dir", ADAPTER_CACHE_DIR],
        "env": agent_env(spec),
        "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "resources": container_resources(Resources(gpus=0, limits=AGENT_LIMITS), base=AGENT_REQUESTS),
        "securityContext": container_security_context(),
        "volumeMounts": [*_cache_mounts(read_only=False), scratch_mount(AGENT_CONTAINER), *claim_mounts],
        "readinessProbe": _http_probe("/readyz", "agent", 2, 1, timeout=2),
        "livenessProbe": _http_probe("/healthz", "agent", 10, 6),
    }


def mounted_claims(spec: AdapterDeploymentSpec, adapter_uris: Iterable[str | None]) -> list[str]:
    """Claims of the base model and of every pvc:// adapter (sorted, so the template is stable)."""
    return pvc_claims([spec.base_model.uri, *adapter_uris])


def template_hash(template: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the pod template (without this annotation), 16 hex digits."""
    return hashlib.sha256(json.dumps(template, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def pod_template(ad_name: str, spec: AdapterDeploymentSpec, image: str, pull_policy: str,
                 claims: list[str]) -> Manifest:
    volumes, mounts = pvc_volumes(claims, read_only=True)
    volumes = [{"name": CACHE_VOLUME, "emptyDir": {}}, {"name": HF_CACHE_VOLUME, "emptyDir": {}}, scratch_volume(),
               *volumes]
    if spec.engine == "vllm":
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
    pod_spec: Manifest = {
        "serviceAccountName": agent_account_name(ad_name),
        "enableServiceLinks": False,  # a Service named "vllm" would inject VLLM_PORT=tcp://… and break vLLM
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": 30,
        "containers": [engine_container(spec, image, pull_policy, mounts),
                       agent_container(ad_name, spec, image, pull_policy, mounts)],
        "volumes": volumes,
        **placement(spec.resources),
    }
    template: Manifest = {"metadata": {"labels": server_labels(ad_name)}, "spec": pod_spec}
    template["metadata"]["annotations"] = {TEMPLATE_HASH_ANNOTATION: template_hash(template)}
    return template


def server_deployment(owner: ObjectRef, spec: AdapterDeploymentSpec, *, image: str,
                      pull_policy: str = "IfNotPresent", adapter_uris: Iterable[str | None] = ()) -> Manifest:
    """The Deployment; ``image`` is vllm.image or the operator's default server image.

    ``adapter_uris`` only contributes the claims of pvc:// adapters; every other property of the adapters
    is ignored here on purpose.
    """
    name = owner.name
    template = pod_template(name, spec, image, pull_policy, mounted_claims(spec, adapter_uris))
    meta = object_meta(name, owner, server_labels(name))
    meta["annotations"] = {TEMPLATE_HASH_ANNOTATION: template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": rollout_strategy(spec),
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1800 if spec.engine == "vllm" else 600,
            "template": template,
        },
    }



def rollout_strategy(spec: AdapterDeploymentSpec) -> Manifest:
    """GPU: replace in place (no spare GPU needed); CPU: surge one pod first (no gap in serving)."""
    gpu = spec.engine == "vllm" and spec.resources.gpus > 0
    surge, unavailable = (0, 1) if gpu else (1, 0)
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}


def server_pdb(owner: ObjectRef) -> Manifest:
    """At most one serving pod voluntarily disrupted (drain, eviction) at a time."""
    name = owner.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(pdb_name(name), owner, server_labels(name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }
