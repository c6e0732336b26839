"""Names, labels and ports every AdapterDeployment child agrees on (see docs/design.md, "AdapterDeployment").

The agent, the Service selector, the operator's pod index and the e2e tests all find objects by these
names and labels, so they live in one place instead of being spelled in each builder.

Every child carries ``kubelora.io/adapterdeployment=<name>`` (the instance label) and
``app.kubernetes.io/managed-by=kubelora-operator`` (pods included: the operator's Pod watch selects on it,
shared with the LoRAJob pods), never ``app.kubernetes.io/instance`` nor any label copied from the owner:
Argo CD tracks its Applications' resources by that label and would prune children it did not render.
"""

from __future__ import annotations

from kubelora.api.meta import ObjectRef
from kubelora.resources.pods import APP_LABEL, COMPONENT, DEPLOYMENT_LABEL, MANAGED_BY, MANAGER, PART_OF

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


def pdb_name(ad_name: str) -> str:
    """PodDisruptionBudget of the serving pods."""
    return ad_name


def selector_labels(ad_name: str) -> dict[str, str]:
    """The Deployment's selector: immutable once created, so it holds only what never changes."""
    return {DEPLOYMENT_LABEL: ad_name, COMPONENT: "server"}


def selector_string(ad_name: str) -> str:
    """The pods' selector as ``status.selector`` holds it (the scale subresource's labelSelectorPath)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(ad_name).items()))


def server_labels(ad_name: str) -> dict[str, str]:
    """Labels of the pods (and of the Deployment, Service and PodDisruptionBudget)."""
    return {APP_LABEL: SERVER_APP, PART_OF: "kubelora", MANAGED_BY: MANAGER, **selector_labels(ad_name)}


def child_labels(ad_name: str, component: str) -> dict[str, str]:
    """Labels of the non-pod children (ConfigMap, RBAC); they never match the pod selector."""
    return {APP_LABEL: SERVER_APP, DEPLOYMENT_LABEL: ad_name, COMPONENT: component}


def endpoint(owner: ObjectRef, port: int) -> str:
    """The in-cluster OpenAI base URL clients use."""
    return f"http://{owner.name}.{owner.namespace}.svc:{port}/v1"
