"""The operator's one Kubernetes client for what it writes: kr8s's asyncio API, on plain JSON dicts.

kopf watches and reads; everything the operator creates, applies, patches or deletes goes through
:class:`KubeApi`. Why kr8s: it is asyncio-native on httpx (the agent client's library too), finds the
same kubeconfig or in-cluster ServiceAccount as kopf, re-reads rotated projected tokens on a 401, and
lets us send the builders' dicts as they are (the generated models of the ``kubernetes`` package are
strict enough to reject objects real servers return). The reconcilers depend only on :class:`Api`,
which the unit tests fake.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from kubelora.handlers import metrics

JSON = dict[str, Any]
PLURALS = {
    "ConfigMap": "configmaps", "Service": "services", "ServiceAccount": "serviceaccounts", "Role": "roles",
    "RoleBinding": "rolebindings", "Job": "jobs", "Pod": "pods", "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets", "LoRAJob": "lorajobs", "AdapterDeployment": "adapterdeployments",
}
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    """An HTTP error from the API server; ``status`` is the code (0 for connection errors)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def path(api_version: str, kind: str, namespace: str, name: str | None = None, subresource: str = "") -> str:
    """REST path of a namespaced object (or of its collection when ``name`` is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    out = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    if name is not None:
        out += f"/{name}"
    return f"{out}/{subresource}" if subresource else out


def manifest_path(manifest: Mapping[str, Any]) -> str:
    """REST path of the object a manifest describes."""
    meta = manifest["metadata"]
    return path(str(manifest["apiVersion"]), str(manifest["kind"]), str(meta["namespace"]), str(meta["name"]))


class Api(Protocol):
    """What the reconcilers need from the API server; faked in the unit tests."""

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> JSON: ...


async def apply(api: Api, manifest: Mapping[str, Any], field_manager: str) -> JSON:
    """Server-side apply with force: the operator owns every field it sets.

    Two applies that both create the object race, and the loser gets 409 AlreadyExists although the
    object is there; applying again is then an ordinary update.
    """
    for attempt in range(3):
        try:
            return await api.request("PATCH", manifest_path(manifest), dict(manifest), content_type=APPLY_PATCH,
                                     params={"fieldManager": field_manager, "force": "true"})
        except ApiError as exc:
            if exc.status != 409 or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def patch_status(api: Api, object_path: str, status: Mapping[str, Any], field_manager: str) -> JSON:
    """Merge-patch the status subresource of the object at ``object_path``."""
    return await api.request("PATCH", f"{object_path}/status", {"status": dict(status)}, content_type=MERGE_PATCH,
                             params={"fieldManager": field_manager})


class KubeApi:
    """One kr8s API object per operator process, created on first use inside the event loop."""

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._api: Any = None
        self._lock = asyncio.Lock()

    async def _kr8s(self) -> Any:
        async with self._lock:
            if self._api is None:
                import kr8s.asyncio

                with warnings.catch_warnings():
                    # kr8s warns about API server versions newer than it was tested with; we send raw requests.
                    warnings.filterwarnings("ignore", message="Kubernetes version", category=UserWarning)
                    api = await kr8s.asyncio.api()
                # Waiting for one of httpx's pooled connections (100) is queueing, not a failed call: with a
                # pool timeout, a burst of reconciles (1,000 LoRAJobs at once) timed out waiting for a slot and
                # retried, and every retry joined the same queue. Connect, read and write keep the timeout.
                api.timeout = httpx.Timeout(self._timeout, pool=None)
                self._api = api
            return self._api

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> JSON:
        from kr8s import ServerError
        from kr8s._exceptions import APITimeoutError

        base, _, last = path.rpartition("/")  # kr8s joins base and url; version "" adds nothing between them
        kwargs: dict[str, Any] = {"params": dict(params or {}), "headers": {"Accept": "application/json"}}
        if body is not None:
            kwargs["content"] = json.dumps(body)
            kwargs["headers"]["Content-Type"] = content_type
        try:
            api = await self._kr8s()
            async with api.call_api(method, version="", base=base, url=last, **kwargs) as response:
                text = response.text
        except ServerError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            metrics.api_error(status)
            raise ApiError(status, f"{method} {path}: {exc}") from None
        except (httpx.HTTPError, APITimeoutError, OSError) as exc:
            metrics.api_error(0)
            raise ApiError(0, f"{method} {path}: {exc!r}") from exc
        return json.loads(text) if text else {}

    async def close(self) -> None:
        session = getattr(self._api, "_session", None)  # kr8s has no public close; its session is httpx's
        if session is not None:
            await session.aclose()
        self._api = None


API = KubeApi()
"""The operator process's client, shared by both kinds' handlers."""
