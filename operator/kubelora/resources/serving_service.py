"""Service ``<ad>`` and the agent's identity: ServiceAccount, Role and RoleBinding ``<ad>-agent``.

The Role grants read access to exactly one ConfigMap (``<ad>-adapters``): the agent needs to watch its
desired adapters and nothing else, so a compromised serving pod cannot read other configuration.
"""

from __future__ import annotations

from kubelora.api.adapterdeployment import AdapterDeploymentSpec
from kubelora.api.meta import ObjectRef
from kubelora.resources.pods import Manifest, object_meta
from kubelora.resources.serving_common import (
    ENGINE_PORT,
    agent_account_name,
    child_labels,
    configmap_name,
    selector_labels,
    server_labels,
)

AGENT_CONFIGMAP_VERBS = ("get", "list", "watch")


def server_service(owner: ObjectRef, spec: AdapterDeploymentSpec) -> Manifest:
    """Routes spec.service.port to the engine's OpenAI API (8000) on Ready pods only."""
    name = owner.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, owner, server_labels(name)),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": ENGINE_PORT, "protocol": "TCP"}],
        },
    }


def agent_service_account(owner: ObjectRef) -> Manifest:
    name = owner.name
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(agent_account_name(name), owner, child_labels(name, "agent")),
    }


def agent_role(owner: ObjectRef) -> Manifest:
    """get/list/watch on the one ConfigMap. A list/watch restricted by resourceNames only works with a
    fieldSelector on metadata.name, which is how the agent must watch it."""
    name = owner.name
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(agent_account_name(name), owner, child_labels(name, "agent")),
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [configmap_name(name)],
                   "verbs": list(AGENT_CONFIGMAP_VERBS)}],
    }


def agent_role_binding(owner: ObjectRef) -> Manifest:
    name = owner.name
    account = agent_account_name(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(account, owner, child_labels(name, "agent")),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": owner.namespace}],
    }
