"""A small asyncio client for the few calls the LoRAJob handlers make (aiohttp, plain JSON dicts).

Why not the ``kubernetes`` package: its models are strict (v37 validates with pydantic and rejects
objects older API servers return), every call blocks a thread, and we need five verbs on plain
JSON. Credentials come from ``kopf.login_via_client`` -- the same kubeconfig or in-cluster identity
kopf itself uses -- and are re-read once on a 401, as tokens of projected ServiceAccounts rotate.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp
import kopf

JSON = dict[str, Any]
PLURALS = {
    "ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
    "Job": "jobs", "Pod": "pods", "LoRAJob": "lorajobs",
}
MERGE_PATCH = "application/merge-patch+json"


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


class Api(Protocol):
    """What the reconciler needs from the API server; faked in the unit tests."""

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> JSON: ...


class KubeApi:
    """aiohttp session with kopf's credentials; one per operator process."""

    def __init__(self, settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any],
                 timeout: float = 30.0) -> None:
        self._settings = settings
        self._logger = logger
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None
        self._login_lock = asyncio.Lock()

    async def _login(self, force: bool = False) -> tuple[aiohttp.ClientSession, kopf.ConnectionInfo]:
        async with self._login_lock:
            if force or self._session is None or self._info is None:
                info = await asyncio.to_thread(kopf.login_via_client, logger=self._logger, settings=self._settings)
                if info is None:
                    raise ApiError(0, "no Kubernetes credentials (neither in-cluster nor kubeconfig)")
                if self._session is not None:
                    await self._session.close()
                connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=64)
                self._session = aiohttp.ClientSession(
                    connector=connector, timeout=self._timeout,
                    headers={**info.as_http_headers(), "Accept": "application/json"})
                self._info = info
            return self._session, self._info

    async def request(self, method: str, path: str, body: JSON | None = None, *,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> JSON:
        for attempt in (1, 2):
            session, info = await self._login(force=attempt == 2)
            data = json.dumps(body) if body is not None else None
            headers = {"Content-Type": content_type} if data is not None else {}
            try:
                async with session.request(method, info.server.rstrip("/") + path, data=data, headers=headers,
                                           params=dict(params or {})) as resp:
                    text = await resp.text()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApiError(0, f"{method} {path}: {exc!r}") from exc
            if status == 401 and attempt == 1:
                continue
            if status >= 400:
                try:
                    message = str(json.loads(text).get("message", text))
                except ValueError:
                    message = text
                raise ApiError(status, f"{method} {path}: {message}")
            return json.loads(text) if text else {}
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
