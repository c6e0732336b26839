"""Server-side apply of the AdapterDeployment's children, on plain dicts.

Why server-side apply: one idempotent call creates a missing child, updates a drifted one, takes over
(adopts) one created by hand, and removes fields the operator stopped setting, without a read first.
Why raw dicts through ``ApiClient.call_api``: the builders produce dicts, and the generated model classes
of the ``kubernetes`` client are strict enough to reject objects a real server returns. The client's
default configuration is the one kopf's login loaded, so this uses the operator's credentials.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from kubelora.resources.serving_common import FIELD_MANAGER

Manifest = dict[str, Any]

_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


class ApplyError(RuntimeError):
    """The API server refused an apply; ``status`` is the HTTP code (403 means missing RBAC)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def object_path(manifest: Mapping[str, Any]) -> str:
    """/api/v1/namespaces/ns/configmaps/name or /apis/apps/v1/namespaces/ns/deployments/name."""
    api_version = str(manifest["apiVersion"])
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    meta = manifest["metadata"]
    return f"{prefix}/namespaces/{meta['namespace']}/{_PLURALS[manifest['kind']]}/{meta['name']}"


def _load_config() -> None:
    """Fall back to in-cluster or kubeconfig credentials if nothing configured the client yet."""
    from kubernetes import client, config

    if client.Configuration.get_default_copy().host not in ("", "http://localhost"):
        return
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Applier:
    """A thread-safe wrapper over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any = None) -> None:
        self._api = api_client
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:
            if self._api is None:
                from kubernetes import client

                _load_config()
                self._api = client.ApiClient()
            return self._api

    def _patch(self, path: str, body: Mapping[str, Any], content_type: str,
               query: list[tuple[str, str]]) -> Manifest:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._client().call_api(
                path, "PATCH", query_params=query,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=dict(body), auth_settings=["BearerToken"], _preload_content=False,
                _return_http_data_only=True, _request_timeout=30)
        except ApiException as exc:
            raise ApplyError(int(exc.status or 0), f"PATCH {path}: HTTP {exc.status}: {_message(exc.body)}") from None
        data: Manifest = json.loads(resp.data or b"{}")
        return data

    def apply(self, manifest: Mapping[str, Any]) -> Manifest:
        """PATCH application/apply-patch+yaml with force: the operator owns every field it sets.

        Two applies that both create the object race, and the loser gets 409 AlreadyExists although the
        object is there; applying again is then an ordinary update.
        """
        for attempt in range(3):
            try:
                return self._patch(object_path(manifest), manifest, "application/apply-patch+yaml",
                                   [("fieldManager", FIELD_MANAGER), ("force", "true")])
            except ApplyError as exc:
                if exc.status != 409 or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def patch_status(self, path: str, status: Mapping[str, Any]) -> Manifest:
        """Merge-patch the status subresource of the object at ``path``.

        Done here rather than through kopf's ``patch`` kwarg: kopf applies a timer's patch outside the
        handler, and an API error there ends that object's timer for good instead of being retried.
        """
        return self._patch(f"{path}/status", {"status": dict(status)}, "application/merge-patch+json",
                           [("fieldManager", FIELD_MANAGER)])


def _message(body: Any) -> str:
    try:
        return str(json.loads(body).get("message", body))
    except (TypeError, ValueError):
        return str(body)


APPLIER = Applier()
