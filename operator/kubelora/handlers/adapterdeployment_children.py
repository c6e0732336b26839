"""Build every child of an AdapterDeployment and apply the ones that changed.

The supervisor applies only the children whose rendered manifest differs from what this operator process
last applied (kept in its memo of the object), so a steady state makes no API calls at all, while a
LoRAJob publishing a new adapter reaches the ConfigMap within one poll interval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.meta import ObjectRef
from kubelora.reconcile.adapterdeployment_refs import ResolvedAdapter
from kubelora.resources.pods import Manifest
from kubelora.resources.serving_configmap import adapters_configmap, desired_adapters
from kubelora.resources.serving_deployment import server_deployment, server_pdb
from kubelora.resources.serving_service import (
    agent_role,
    agent_role_binding,
    agent_service_account,
    server_service,
)

APPLIED_KEY = "kubelora_applied"
"""memo key: {"Kind/name": sha256 of the manifest last applied by this process}."""


def build_children(owner: ObjectRef, spec: AdapterDeploymentSpec, resolved: Sequence[ResolvedAdapter],
                   *, image: str, pull_policy: str) -> list[Manifest]:
    """Every child, in dependency order: RBAC and ConfigMap before the pods that use them.

    Raises ``ServingSpecError`` for a spec that cannot be served.
    """
    desired = [d for d in (r.desired for r in resolved) if d is not None]
    children = [
        agent_service_account(owner),
        agent_role(owner),
        agent_role_binding(owner),
        adapters_configmap(owner, desired_adapters(spec, desired)),
        server_deployment(owner, spec, image=image, pull_policy=pull_policy,
                          adapter_uris=[r.claim_uri for r in resolved]),
        server_service(owner, spec),
        server_pdb(owner),
    ]
    # Owned through object_meta's controller reference. Not kopf.adopt: it copies the owner's labels, and
    # Argo CD's app.kubernetes.io/instance on a child makes Argo CD prune it as an unknown resource.
    return children


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def child_key(manifest: Mapping[str, Any]) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


def changed(children: Sequence[Manifest], memo: MutableMapping[str, Any]) -> list[Manifest]:
    """The children whose manifest differs from the last one applied by this process."""
    applied: dict[str, str] = memo.get(APPLIED_KEY) or {}
    return [c for c in children if applied.get(child_key(c)) != manifest_hash(c)]


async def apply_children(children: Sequence[Manifest], memo: MutableMapping[str, Any],
                         apply: Callable[[Manifest], Awaitable[Any]]) -> list[str]:
    """Apply each child (in order) and remember its hash; returns the keys applied."""
    applied: dict[str, str] = dict(memo.get(APPLIED_KEY) or {})
    done = []
    for child in children:
        await apply(child)
        applied[child_key(child)] = manifest_hash(child)
        memo[APPLIED_KEY] = dict(applied)
        done.append(child_key(child))
    return done
