"""Container environment and `$(VAR)` expansion, following the kubelet's rules.

Kubernetes expands `$(VAR)` in command, args and env values using the variables declared so far
(plus service variables); `$$` is an escaped `$`, and an undefined `$(VAR)` stays as written.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from ..kube import Kube, KubeError
from .context import ConfigError, Obj

_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


def expand(text: str, mapping: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return mapping.get(name, m.group(0))

    return _REF.sub(sub, text)


def get_object(
    kube: Kube, namespace: str, kind: str, name: str, optional: bool, missing: str = "CreateContainerConfigError"
) -> Obj | None:
    """A namespaced core object, None if optional and absent; otherwise absence is a ConfigError(missing)."""
    try:
        return kube.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
    except KubeError as e:
        if e.status == 404:
            if optional:
                return None
            waiting = " (waiting for it)" if missing == "ContainerCreating" else ""
            raise ConfigError(missing, f'{kind.rstrip("s")} "{name}" not found{waiting}') from e
        raise


def object_data(obj: Obj) -> dict[str, bytes]:
    """The key -> bytes of a Secret (base64 `data`) or ConfigMap (`data` + base64 `binaryData`)."""
    out: dict[str, bytes] = {}
    if obj.get("kind") == "Secret":
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v)
        for k, v in (obj.get("stringData") or {}).items():
            out[k] = v.encode()
    else:
        for k, v in (obj.get("data") or {}).items():
            out[k] = v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = base64.b64decode(v)
    return out


def key_value(kube: Kube, namespace: str, kind: str, ref: Obj) -> str | None:
    """Value of a secretKeyRef/configMapKeyRef (None if optional and absent)."""
    optional = bool(ref.get("optional"))
    obj = get_object(kube, namespace, kind, ref["name"], optional)
    if obj is None:
        return None
    data = object_data(obj)
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError("CreateContainerConfigError", f"couldn't find key {ref['key']} in {kind[:-1]} {ref['name']}")
    return data[ref["key"]].decode("utf-8", "replace")


def field_value(pod: Obj, path: str, pod_ip: str) -> str:
    """Downward API fieldRef."""
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": pod_ip.rsplit(".", 1)[0] + ".1",  # the node is the .1 of every pod's /24
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
    }
    if path not in values:
        raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")
    return str(values[path])


def resource_value(container: Obj, ref: Obj, host_cpus: int, host_mem: int) -> str:
    """resourceFieldRef: the limit if set, else the node's capacity (like the kubelet)."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    limits = (container.get("resources") or {}).get(kind) or {}
    raw = limits.get(name)
    if name == "cpu":
        value = _cpu(raw) if raw else float(host_cpus)
        divisor = _cpu(ref.get("divisor", "1"))
        return str(max(1, int(-(-value // divisor))))
    if raw is None:
        return str(host_mem)
    return str(raw)


def _cpu(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def container_env(
    kube: Kube,
    pod: Obj,
    container: Obj,
    base: dict[str, str],
    service_env: dict[str, str],
    pod_ip: str,
    host_cpus: int,
    host_mem: int,
) -> dict[str, str]:
    """`base` (host env) + service env + envFrom + env, with `$(VAR)` expansion of values."""
    namespace = pod["metadata"]["namespace"]
    declared: dict[str, str] = dict(service_env)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        kind, ref = ("configmaps", src["configMapRef"]) if "configMapRef" in src else ("secrets", src["secretRef"])
        obj = get_object(kube, namespace, kind, ref["name"], bool(ref.get("optional")))
        for k, v in object_data(obj or {}).items():
            declared[prefix + k] = v.decode("utf-8", "replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            declared[name] = expand(var.get("value", ""), declared)
            continue
        src = var["valueFrom"]
        value: str | None
        if "fieldRef" in src:
            value = field_value(pod, src["fieldRef"]["fieldPath"], pod_ip)
        elif "secretKeyRef" in src:
            value = key_value(kube, namespace, "secrets", src["secretKeyRef"])
        elif "configMapKeyRef" in src:
            value = key_value(kube, namespace, "configmaps", src["configMapKeyRef"])
        elif "resourceFieldRef" in src:
            value = resource_value(container, src["resourceFieldRef"], host_cpus, host_mem)
        else:
            raise ConfigError("CreateContainerConfigError", f"unsupported valueFrom for env {name}")
        if value is not None:
            declared[name] = value
    env = {**base, **declared}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
