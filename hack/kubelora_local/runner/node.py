"""Register the Node `local-node` with real capacity and keep its Ready heartbeat fresh.

kube-scheduler places pods against this capacity: the host's CPUs and memory and a configured
`nvidia.com/gpu` count (default 0), so a GPU request beyond it stays Pending with the scheduler's
reason. The node lifecycle controller marks a node Unknown after 40 s without a heartbeat and then
evicts its pods, so the status is re-posted every 10 s.
"""

from __future__ import annotations

import logging
import os
import platform
import threading

from ..kube import Kube, KubeError
from .context import Obj, now

log = logging.getLogger("kubelora.runner")
HEARTBEAT = 10.0
STARTED = now()


GPU_RESOURCE = "nvidia.com/gpu"


def _status(since: str, gpus: int, address: str) -> Obj:
    ts = now()
    mem_ki = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    capacity = {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_ki}Ki",
        "pods": "250",
        "ephemeral-storage": "100Gi",
        GPU_RESOURCE: str(gpus),
    }

    def cond(kind: str, status: str, reason: str) -> Obj:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "lastHeartbeatTime": ts,
            "lastTransitionTime": since,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("Ready", "True", "KubeletReady"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": address},
            {"type": "Hostname", "address": "local-node"},
        ],
        "nodeInfo": {
            "kubeletVersion": "v1.37.2-kubelora-local",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            "containerRuntimeVersion": "local://process",
            "osImage": platform.platform(),
            "kernelVersion": platform.release(),
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    }


def register(kube: Kube, name: str, address: str, gpus: int = 0) -> None:
    """Create (or take over) the Node and mark it Ready."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubelora.dev/local": "true",
            },
        },
        "spec": {},
    }
    try:
        kube.create("/api/v1/nodes", body)
    except KubeError as e:
        if e.status != 409:
            raise
    kube.merge_patch(f"/api/v1/nodes/{name}/status", {"status": _status(STARTED, gpus, address)})


def heartbeat(kube: Kube, name: str, address: str, gpus: int, stop: threading.Event) -> None:
    """Re-post the node status until `stop` is set (runs in its own thread)."""
    while not stop.wait(HEARTBEAT):
        try:
            kube.merge_patch(f"/api/v1/nodes/{name}/status", {"status": _status(STARTED, gpus, address)})
        except Exception as e:
            log.warning("node heartbeat failed: %s", e)
