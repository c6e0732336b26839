"""Pod volumes as host directories, and the bind mounts that put them at the container's paths.

PVC -> `<state>/pvcs/<ns>/<claim>` (survives the pod, like a real claim); emptyDir -> a per-pod
dir; ConfigMap/Secret/downwardAPI/projected -> files written into a per-pod dir and refreshed while
the pod runs (the kubelet also refreshes them). The ServiceAccount admission plugin adds a projected
`kube-api-access-*` volume; its token comes from the TokenRequest API, bound to the pod, and is
renewed at 80 % of its lifetime as the kubelet does.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..kube import Kube, KubeError
from .context import ConfigError, Obj, RunnerContext
from .envvars import field_value, get_object, object_data

FILE_VOLUMES = ("configMap", "secret", "downwardAPI", "projected")


@dataclass(frozen=True)
class Mount:
    """One bind mount: host `source` onto `target` inside the container's mount namespace."""

    source: Path
    target: str
    read_only: bool = False


def _fetch(kube: Kube, namespace: str, kind: str, name: str, optional: bool) -> Obj | None:
    # A missing volume source keeps the pod ContainerCreating (the kubelet retries), unlike a missing env source.
    return get_object(kube, namespace, kind, name, optional, missing="ContainerCreating")


def _select(data: dict[str, bytes], items: list[Obj] | None, optional: bool, what: str) -> dict[str, bytes]:
    """Apply `items` (key -> relative path) or take every key."""
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] in data:
            out[item["path"]] = data[item["key"]]
        elif not optional:
            raise ConfigError("ContainerCreating", f"key {item['key']!r} not found in {what}")
    return out


def _files_for(ctx: RunnerContext, pod: Obj, source_kind: str, src: Obj, pod_ip: str) -> dict[str, bytes]:
    """Files (relative path -> content) of one configMap/secret/downwardAPI/SA-token source."""
    ns = pod["metadata"]["namespace"]
    if source_kind == "configMap":
        obj = _fetch(ctx.kube, ns, "configmaps", src["name"], bool(src.get("optional")))
        return _select(object_data(obj or {}), src.get("items"), bool(src.get("optional")), f"configmap {src['name']}")
    if source_kind == "secret":
        name = src.get("secretName") or src["name"]
        obj = _fetch(ctx.kube, ns, "secrets", name, bool(src.get("optional")))
        return _select(object_data(obj or {}), src.get("items"), bool(src.get("optional")), f"secret {name}")
    if source_kind == "downwardAPI":
        files = {}
        for item in src.get("items") or []:
            if "fieldRef" not in item:
                raise ConfigError("ContainerCreating", "downwardAPI: only fieldRef items are supported")
            files[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"], pod_ip).encode()
        return files
    if source_kind == "serviceAccountToken":
        return {src["path"]: sa_token(ctx, pod, src)}
    raise ConfigError("ContainerCreating", f"projected source {source_kind!r} is not supported")


_tokens: dict[tuple[str, str, int], tuple[float, bytes]] = {}
_tokens_lock = threading.Lock()


def sa_token(ctx: RunnerContext, pod: Obj, src: Obj) -> bytes:
    """A pod-bound token of the pod's ServiceAccount from the TokenRequest API, reused until 80 % of its life."""
    meta = pod["metadata"]
    audience = src.get("audience") or ""
    lifetime = int(src.get("expirationSeconds") or 3607)
    key = (meta["uid"], audience, lifetime)
    with _tokens_lock:
        cached = _tokens.get(key)
    if cached and time.monotonic() < cached[0]:
        return cached[1]
    sa_name = pod["spec"].get("serviceAccountName") or "default"
    spec: Obj = {
        "expirationSeconds": lifetime,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
    }
    if audience:
        spec["audiences"] = [audience]
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    try:
        resp = ctx.kube.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa_name}/token", body)
    except KubeError as e:
        raise ConfigError("ContainerCreating", f"token for serviceaccount {sa_name}: {e}") from e
    token = str(resp["status"]["token"]).encode()
    with _tokens_lock:
        _tokens[key] = (time.monotonic() + 0.8 * lifetime, token)
    return token


def forget_tokens(uid: str) -> None:
    """Drop a finished pod's cached tokens."""
    with _tokens_lock:
        for key in [k for k in _tokens if k[0] == uid]:
            del _tokens[key]


def volume_files(ctx: RunnerContext, pod: Obj, volume: Obj, pod_ip: str) -> dict[str, bytes]:
    """Every file of a file-backed volume."""
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            for kind, src in source.items():
                files.update(_files_for(ctx, pod, kind, src, pod_ip))
        return files
    for kind in ("configMap", "secret", "downwardAPI"):
        if kind in volume:
            return _files_for(ctx, pod, kind, volume[kind], pod_ip)
    return {}


def write_files(directory: Path, files: dict[str, bytes], mode: int, previous: set[str]) -> set[str]:
    """Write changed files atomically (rename) and drop the ones that disappeared."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.read_bytes() == content:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.chmod(mode)
        os.replace(tmp, path)
    for rel in previous - set(files):
        (directory / rel).unlink(missing_ok=True)
    return set(files)


class PodVolumes:
    """Host paths of a pod's volumes; `refresh()` keeps ConfigMap/Secret files current."""

    def __init__(self, ctx: RunnerContext, pod: Obj, pod_ip: str) -> None:
        self.ctx = ctx
        self.pod = pod
        self.pod_ip = pod_ip
        self.root = ctx.pod_dir(pod) / "volumes"
        self.paths: dict[str, Path] = {}
        self._written: dict[str, set[str]] = {}

    def prepare(self) -> None:
        """Create every volume; raises ConfigError while a referenced object is missing."""
        ns = self.pod["metadata"]["namespace"]
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                path = self.ctx.pvc_dir(ns, vol["persistentVolumeClaim"]["claimName"])
                path.mkdir(parents=True, exist_ok=True)
            elif "emptyDir" in vol:
                path = self.root / name
                path.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
            elif any(k in vol for k in FILE_VOLUMES):
                path = self.root / name
            else:
                kinds = sorted(set(vol) - {"name"})
                raise ConfigError("CreateContainerConfigError", f"volume {name}: type {kinds} is not supported locally")
            self.paths[name] = path
        self.refresh()

    def refresh(self) -> None:
        for vol in self.pod["spec"].get("volumes") or []:
            kind = next((k for k in FILE_VOLUMES if k in vol), None)
            if kind is None:
                continue
            mode = int(vol[kind].get("defaultMode", 0o644))
            files = volume_files(self.ctx, self.pod, vol, self.pod_ip)
            name = vol["name"]
            self._written[name] = write_files(self.paths[name], files, mode, self._written.get(name, set()))

    def mounts(self, container: Obj) -> list[Mount]:
        """Bind mounts for a container's volumeMounts (with subPath), parents before children."""
        out = []
        for vm in container.get("volumeMounts") or []:
            if vm["name"] not in self.paths:
                raise ConfigError("CreateContainerConfigError", f"volumeMount {vm['name']!r}: no such volume")
            source = self.paths[vm["name"]]
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            out.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly"))))
        return sorted(out, key=lambda m: m.target.rstrip("/").count("/"))

    def cleanup(self) -> None:
        """Remove the per-pod dir (emptyDirs, files); PVC dirs stay."""
        forget_tokens(self.pod["metadata"]["uid"])
        shutil.rmtree(self.ctx.pod_dir(self.pod), ignore_errors=True)
