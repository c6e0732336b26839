"""Names, labels and ports every AdapterDeployment child agrees on (see docs/design.md, "AdapterDeployment").

The agent, the Service selector, the operator's pod index and the e2e tests all find objects by these
names and labels, so they live in one place instead of being spelled in each builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubelora.resources.pods import APP_LABEL, COMPONENT, DEPLOYMENT_LABEL, INSTANCE

ENGINE_CONTAINER = "engine"
AGENT_CONTAINER = "agent"
ENGINE_PORT = 8000
"""The OpenAI-compatible API of the engine (vLLM or the CPU engine)."""
AGENT_PORT = 8081
"""The agent's /healthz, /readyz and /adapters (read-only)."""
SERVER_APP = "kubelora-server"
TEMPLATE_HASH_ANNOTATION = "kubelora.io/template-hash"
"""On the pod template: a hash of everything that must restart pods (never the adapter list)."""
FIELD_MANAGER = "kubelora-operator"


def configmap_name(ad_name: str) -> str:
    """ConfigMap holding DesiredAdapters: the only object that changes when adapters change."""
    return f"{ad_name}-adapters"


def agent_account_name(ad_name: str) -> str:
    """ServiceAccount (and its Role/RoleBinding) of the agent sidecar."""
    return f"{ad_name}-agent"


def selector_labels(ad_name: str) -> dict[str, str]:
    """The Deployment's selector: immutable once created, so it holds only what never changes."""
    return {DEPLOYMENT_LABEL: ad_name, COMPONENT: "server"}


def server_labels(ad_name: str) -> dict[str, str]:
    return {APP_LABEL: SERVER_APP, INSTANCE: ad_name, **selector_labels(ad_name)}


def child_labels(ad_name: str, component: str) -> dict[str, str]:
    """Labels of the non-pod children (ConfigMap, RBAC); they never match the pod selector."""
    return {APP_LABEL: SERVER_APP, INSTANCE: ad_name, DEPLOYMENT_LABEL: ad_name, COMPONENT: component}


def endpoint(body: Mapping[str, Any], port: int) -> str:
    """The in-cluster OpenAI base URL clients use."""
    meta = body["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{port}/v1"
