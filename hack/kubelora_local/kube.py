"""A tiny JSON REST client for the local API server (urllib3, plain dicts).

Why not the `kubernetes` package: its v37 models are strict pydantic classes that reject objects
the server legitimately returns (e.g. Events with a null eventTime), it reads KUBECONFIG at
import time, and importing it costs ~1 s. The runner and the cluster bring-up only need a handful of
verbs on plain JSON, so a ~100-line client is simpler and more robust.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3

JSON = dict[str, Any]
log = logging.getLogger("kubelora.local")


class KubeError(RuntimeError):
    """An HTTP error from the API server; `status` is the HTTP code (404, 409, 410, ...)."""

    def __init__(self, status: int, body: str, what: str) -> None:
        self.status = status
        self.body = body
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{what}: HTTP {status}: {message}")


@dataclass(frozen=True)
class Credentials:
    """What a client needs: server URL, bearer token, CA file."""

    server: str
    token: str
    ca_file: str


class Kube:
    """Thread-safe (urllib3 pool) client returning decoded JSON dicts."""

    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.timeout = timeout
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=32, cert_reqs="CERT_REQUIRED", ca_certs=creds.ca_file)
        self._headers = {"Authorization": f"Bearer {creds.token}", "Accept": "application/json"}

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.creds.server}{path}{query}"

    def request(
        self,
        method: str,
        path: str,
        body: JSON | None = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        """One call; raises KubeError on HTTP >= 400."""
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(
            method,
            self._url(path, params),
            body=data,
            headers=headers,
            timeout=timeout or self.timeout,
            retries=False,
        )
        text = resp.data.decode("utf-8", "replace")
        if resp.status >= 400:
            raise KubeError(resp.status, text, f"{method} {path}")
        return json.loads(text) if text else {}

    def text(self, path: str, timeout: float | None = None) -> str:
        """GET a non-JSON endpoint such as /readyz."""
        resp = self._pool.request(
            "GET",
            self._url(path, None),
            headers=self._headers,
            timeout=timeout or self.timeout,
            retries=False,
        )
        body = resp.data.decode("utf-8", "replace")
        if resp.status >= 400:
            raise KubeError(resp.status, body, f"GET {path}")
        return body

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: JSON) -> JSON:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        return self.request("DELETE", path, body)

    def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 240, params: dict[str, str] | None = None
    ) -> Iterator[JSON]:
        """Yield watch events ({type, object}) until the server closes the stream."""
        params = {
            **(params or {}),
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
        }
        resp = self._pool.request(
            "GET",
            self._url(path, params),
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30),
            retries=False,
        )
        try:
            if resp.status >= 400:
                raise KubeError(resp.status, resp.read().decode("utf-8", "replace"), f"WATCH {path}")
            buf = b""
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


def list_watch(
    kube: Kube, path: str, handle: Callable[[str, JSON], None], stop: threading.Event, **params: str
) -> None:
    """List, then watch `path`, calling `handle(event_type, obj)` ("SYNC" for listed objects) until `stop`."""
    while not stop.is_set():
        try:
            listing = kube.get(path, **params)
            for obj in listing.get("items") or []:
                handle("SYNC", obj)
            rv = listing["metadata"]["resourceVersion"]
            while not stop.is_set():
                for event in kube.watch(path, rv, params=params):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise KubeError(int(obj.get("code", 500)), str(obj), f"watch {path}")
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        handle(event["type"], obj)
        except Exception as e:
            if stop.is_set():
                return
            if not (isinstance(e, KubeError) and e.status == 410):
                log.warning("watch of %s broke (%s); relisting", path, e)
                time.sleep(0.5)
