"""Where the desired set comes from: the ``<ad>-adapters`` ConfigMap (in a pod) or a file (tests, bench).

Both keep the last good :class:`DesiredAdapters` and call ``notify`` when it changes. A broken update is
logged and ignored: the agent keeps serving the last good set rather than unloading everything because of a
typo (the operator validates what it writes, so this is a guard, not a feature).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from kubelora.api.runtime import DESIRED_ADAPTERS_KEY, DesiredAdapters

log = logging.getLogger(__name__)
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class DesiredSource(Protocol):
    desired: DesiredAdapters | None
    generation: str

    async def run(self, notify: Callable[[], None]) -> None:
        """Follow the source until cancelled, calling ``notify`` after each change."""


def parse_desired(raw: str | bytes, where: str) -> DesiredAdapters | None:
    try:
        return DesiredAdapters.model_validate_json(raw)
    except ValidationError as exc:
        log.error("ignoring invalid desired set in %s: %s", where, exc)
        return None


class FileSource:
    """Polls a JSON file (``DesiredAdapters`` wire format); the generation is the content hash."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self.desired: DesiredAdapters | None = None
        self.generation = ""
        self._mtime: tuple[int, int] | None = None

    def poll(self) -> bool:
        """Read the file if it changed; True when the desired set changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._mtime:
            return False
        self._mtime = stamp
        raw = self.path.read_bytes()
        generation = "sha256:" + hashlib.sha256(raw).hexdigest()[:12]
        if generation == self.generation:
            return False
        desired = parse_desired(raw, str(self.path))
        if desired is None:
            return False
        self.desired, self.generation = desired, generation
        log.info("desired set %s from %s: %s", generation, self.path, [a.name for a in desired.adapters])
        return True

    async def run(self, notify: Callable[[], None]) -> None:
        while True:
            if self.poll():
                notify()
            await asyncio.sleep(self.interval)


def default_namespace() -> str:
    """``$POD_NAMESPACE``, else the ServiceAccount's namespace file, else ``default``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return Path(SA_NAMESPACE_FILE).read_text().strip()
    except OSError:
        return "default"


class ConfigMapSource:
    """Watches one ConfigMap (list + watch with a field selector, re-list after any error).

    The kubernetes client is synchronous, so the watch runs in a daemon thread and hands results to the
    event loop with ``call_soon_threadsafe``. The Role allows get/list/watch on this one ConfigMap only.
    """

    def __init__(self, name: str, namespace: str, *, retry_delay: float = 2.0, watch_timeout: int = 300,
                 api: Any | None = None) -> None:
        self.name = name
        self.namespace = namespace
        self.retry_delay = retry_delay
        self.watch_timeout = watch_timeout
        self.desired: DesiredAdapters | None = None
        self.generation = ""
        self._api = api
        self._stop = threading.Event()

    def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def apply(self, obj: Any) -> bool:
        """Take a ConfigMap object (client model or dict); True when the desired set changed."""
        data = obj.get("data") if isinstance(obj, dict) else obj.data
        meta = obj.get("metadata", {}) if isinstance(obj, dict) else obj.metadata
        rv = meta.get("resourceVersion", "") if isinstance(meta, dict) else (meta.resource_version or "")
        raw = (data or {}).get(DESIRED_ADAPTERS_KEY)
        if raw is None:
            log.error("ConfigMap %s/%s has no key %s; keeping the last desired set",
                      self.namespace, self.name, DESIRED_ADAPTERS_KEY)
            return False
        desired = parse_desired(raw, f"ConfigMap {self.namespace}/{self.name}")
        if desired is None or (desired == self.desired and rv == self.generation):
            return False
        self.desired, self.generation = desired, rv
        log.info("desired set at resourceVersion %s: %s", rv, [a.name for a in desired.adapters])
        return True

    def _follow(self, emit: Callable[[Any], None]) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        selector = f"metadata.name={self.name}"
        while not self._stop.is_set():
            try:
                api = self._core_api()
                listed = api.list_namespaced_config_map(self.namespace, field_selector=selector)
                for item in listed.items:
                    emit(item)
                rv = listed.metadata.resource_version
                w = watch.Watch()
                for event in w.stream(api.list_namespaced_config_map, self.namespace, field_selector=selector,
                                      resource_version=rv, timeout_seconds=self.watch_timeout):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        emit(event["object"])
                    elif event["type"] == "DELETED":
                        log.warning("ConfigMap %s/%s was deleted; keeping the last desired set",
                                    self.namespace, self.name)
                    elif event["type"] == "ERROR":
                        log.info("watch error %s; re-listing", event.get("raw_object"))
                        break
            except ApiException as exc:
                log.warning("ConfigMap %s/%s: API error %s %s; re-listing in %.0fs", self.namespace, self.name,
                            exc.status, exc.reason, self.retry_delay)
                self._stop.wait(self.retry_delay)
            except Exception as exc:
                log.warning("ConfigMap %s/%s watch failed: %s; re-listing in %.0fs", self.namespace, self.name,
                            exc, self.retry_delay)
                self._stop.wait(self.retry_delay)

    async def run(self, notify: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def emit(obj: Any) -> None:
            def apply_and_notify() -> None:
                if self.apply(obj):
                    notify()

            loop.call_soon_threadsafe(apply_and_notify)

        thread = threading.Thread(target=self._follow, args=(emit,), name="configmap-watch", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                await asyncio.sleep(1.0)
        finally:
            self._stop.set()
