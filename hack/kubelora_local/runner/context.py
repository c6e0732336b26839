"""Shared runner state and small helpers (timestamps, the error type for bad pod config)."""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kube import Kube
from ..network import PodNetwork
from .ips import IpPool

Obj = dict[str, Any]
# Host variables that must not leak into pods: they would point clients at the wrong cluster.
HIDDEN_ENV = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "POD_IP", "VIRTUAL_ENV")


class ConfigError(Exception):
    """The pod cannot start yet (missing Secret/ConfigMap, bad command): reported as a Waiting reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def now() -> str:
    """RFC 3339 UTC with seconds precision, as the API server stores times."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunnerContext:
    """What every pod worker needs: API access, paths, the IP pool and the host environment."""

    kube: Kube
    state_dir: Path
    api_port: int
    api_host: str = "127.0.0.1"  # the node's address, where pods reach the API server
    node_name: str = "local-node"
    ips: IpPool = field(default_factory=IpPool)
    dns_ip: str = ""  # the cluster DNS every ClusterFirst pod's resolv.conf names ("" = the host's)
    network: PodNetwork | None = None  # None: pods share the host's network (no root)
    # The project virtualenv's bin goes first on PATH so that `python` and the console scripts
    # (kubelora-train, kubelora-agent, ...) resolve to the project's.
    venv_bin: Path = field(default_factory=lambda: Path(sys.prefix) / "bin")

    def host_env(self) -> dict[str, str]:
        """The runner's environment (e.g. HF_HOME, offline flags from CI) minus cluster pointers."""
        env = {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}
        env["PATH"] = f"{self.venv_bin}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        return env

    def pod_dir(self, pod: Obj) -> Path:
        meta = pod["metadata"]
        return self.state_dir / "pods" / str(meta["namespace"]) / f"{meta['name']}-{meta['uid'][:8]}"

    def log_path(self, pod: Obj, container: str) -> Path:
        meta = pod["metadata"]
        return self.state_dir / "logs" / str(meta["namespace"]) / str(meta["name"]) / f"{container}.log"

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        return self.state_dir / "pvcs" / namespace / claim
