"""e2e fixtures: one real local Kubernetes v1.37 cluster (etcd, kube-apiserver, controller-manager,
scheduler, CoreDNS and the pod runner as the node) per session.

`cluster` starts it (building the binaries from Go modules on first use, ~12 min) and fails loudly with the reason if
it cannot; it never skips. Each session gets a private state dir and pod subnet (10.244.R.x), so
parallel sessions do not collide. Set KUBELORA_REUSE_CLUSTER=1 to use (or start and keep) the
cluster of `kubelora-local up` instead, which saves ~6 s per session while iterating.
CRDs come from the repo's crds/ (or $KUBELORA_CRD_DIR) and are applied before the controller-manager.
The node offers `SESSION_GPUS` nvidia.com/gpu, so GPU requests schedule (or stay Pending) for real.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubelora_local import cluster as local_cluster
from kubelora_local.kube import Kube, KubeError
from kubelora_local.paths import cache_root, default_state_dir

SESSION_GPUS = 1


@dataclass
class LocalCluster:
    """Handle on the running cluster: paths, a dict-based REST client and `kubernetes` API objects."""

    info: local_cluster.ClusterInfo
    kubeconfig: Path
    state_dir: Path
    kube: Kube  # plain-dict client (kubelora_local.kube): no model strictness surprises
    api_client: Any  # kubernetes.client.ApiClient configured from the kubeconfig
    core: Any  # kubernetes.client.CoreV1Api
    apps: Any  # kubernetes.client.AppsV1Api
    batch: Any  # kubernetes.client.BatchV1Api
    custom: Any  # kubernetes.client.CustomObjectsApi
    reused: bool = False
    started_in: float = field(default=0.0)

    def wait_for(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """Poll `check` every 0.1 s until it returns something truthy; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
            except (KubeError, KeyError, IndexError, TypeError) as e:
                last_error = e
            time.sleep(0.1)
        pytest.fail(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        """Host directory backing the PVC `claim`, created (and bound by the local provisioner) if new."""
        try:
            self.kube.create(
                f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": claim},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                },
            )
        except KubeError as e:
            if e.status != 409:
                raise
        path = self.state_dir / "pvcs" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        """Host file with a container's stdout+stderr."""
        return self.state_dir / "logs" / namespace / pod / f"{container}.log"

    def logs(self, namespace: str, pod: str, container: str) -> str:
        path = self.log_path(namespace, pod, container)
        return path.read_text(errors="replace") if path.exists() else ""


def _kubernetes_clients(kubeconfig: Path) -> tuple[Any, Any, Any, Any, Any]:
    """kubernetes reads KUBECONFIG at import time: point both the env and its module default at ours."""
    os.environ["KUBECONFIG"] = str(kubeconfig)
    from kubernetes import client, config
    from kubernetes.config import kube_config

    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    config.load_kube_config(config_file=str(kubeconfig))
    api = client.ApiClient()
    return api, client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)


def _print_versions(kubeconfig: Path) -> None:
    """`kubectl version` into the test log: which Kubernetes this run tested against."""
    kubectl = shutil.which("kubectl", path=f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '')}")
    if kubectl is None:
        return
    out = subprocess.run(
        [kubectl, "version", f"--kubeconfig={kubeconfig}"], capture_output=True, text=True, timeout=30, check=False
    )
    sys.stderr.write(f"\n$ kubectl version\n{out.stdout}{out.stderr}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The session's local cluster (see module docstring)."""
    reuse = os.environ.get("KUBELORA_REUSE_CLUSTER") == "1"
    if reuse:
        state_dir, subnet = default_state_dir(), local_cluster.DEFAULT_SUBNET
    else:
        # A private state dir and pod subnet: parallel sessions on one machine never collide.
        (cache_root() / "e2e").mkdir(exist_ok=True)
        state_dir = Path(tempfile.mkdtemp(prefix="session-", dir=cache_root() / "e2e"))
        subnet = f"10.244.{random.randint(1, 254)}"
    started = time.monotonic()
    reused = reuse and local_cluster.is_running(state_dir)
    error = ""
    try:
        info = local_cluster.up(state_dir, pod_subnet=subnet, gpus=SESSION_GPUS)
    except Exception as e:
        error = f"the local Kubernetes cluster could not start ({type(e).__name__}): {e}"
    if error:  # outside the except block: one clear message, no exception chain
        if not reuse:
            shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(error, pytrace=False)
    kubeconfig = Path(info.kubeconfig)
    _print_versions(kubeconfig)
    api, core, apps, batch, custom = _kubernetes_clients(kubeconfig)
    handle = LocalCluster(
        info=info,
        kubeconfig=kubeconfig,
        state_dir=Path(info.state_dir),
        kube=info.client(),
        api_client=api,
        core=core,
        apps=apps,
        batch=batch,
        custom=custom,
        reused=reused,
        started_in=time.monotonic() - started,
    )
    yield handle
    if not reuse:
        local_cluster.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def namespace(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount and CA ConfigMap (pods need both); deleted after."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    cluster.wait_for(
        lambda: (
            cluster.kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
            and cluster.kube.get(f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt")
        ),
        timeout=30,
        what=f"serviceaccount {name}/default and configmap kube-root-ca.crt",
    )
    yield name
    try:
        cluster.kube.delete(f"/api/v1/namespaces/{name}")
    except KubeError as e:
        if e.status != 404:
            raise
