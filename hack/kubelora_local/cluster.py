"""Bring a local Kubernetes v1.37 control plane, its DNS and the pod runner up and down.

Order matters: PKI -> etcd -> apiserver -> /readyz -> kubeconfig -> CRDs -> controller-manager ->
SA default/default and the kube-root-ca.crt ConfigMap -> scheduler -> CoreDNS -> pod runner (the
node) -> Node Ready. CRDs go in before the controller-manager so that its garbage collector knows
them from the start (it re-reads discovery only every 30 s); pods are rejected by the
ServiceAccount admission plugin until default/default exists, so `up` only returns once it does.
Every `up` is a fresh cluster (new PKI, empty etcd, empty PVC dirs); binaries are cached.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from . import build, pki, processes
from .kube import Credentials, Kube, KubeError
from .network import PodNetwork, delete_netns
from .paths import default_state_dir, repo_root
from .runner import provisioner

NODE_NAME = "local-node"
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_SUBNET = "10.244.0"
# Stop order: the runner first (it kills pod processes), etcd last.
COMPONENTS = ("runner", "coredns", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
# Sub-directories of the state dir that `up` wipes: the rest (if any) belongs to the user.
FRESH_DIRS = ("pki", "etcd", "run", "logs", "pvcs", "pods")


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which component and shows its log tail."""


@dataclass(frozen=True)
class ClusterInfo:
    """Everything a client needs; saved as `<state>/cluster.json`."""

    state_dir: str
    kubeconfig: str
    server: str
    token: str
    ca_file: str
    apiserver_port: int
    etcd_port: int
    pod_subnet: str = DEFAULT_SUBNET  # pods get <pod_subnet>.2 .. .254; .1 is the node (see network.py)
    gpus: int = 0  # the node's nvidia.com/gpu capacity, so GPU requests schedule or stay Pending for real

    @property
    def node_ip(self) -> str:
        """The node's (the bridge's) address: the API server and CoreDNS listen there."""
        return PodNetwork(self.pod_subnet).gateway

    @property
    def dns_ip(self) -> str:
        return self.node_ip

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.server, self.token, self.ca_file)

    def client(self) -> Kube:
        return Kube(self.credentials)


def load(state_dir: Path | None = None) -> ClusterInfo:
    """Read `cluster.json` of a cluster started by `up` (raises FileNotFoundError if none)."""
    state = Path(state_dir or default_state_dir())
    return ClusterInfo(**json.loads((state / "cluster.json").read_text()))


def _log_tail(run_dir: Path, name: str, lines: int = 30) -> str:
    try:
        return "\n".join((run_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _fail(run_dir: Path, name: str, what: str) -> ClusterError:
    return ClusterError(f"{what}; last lines of {run_dir / (name + '.log')}:\n{_log_tail(run_dir, name)}")


def _wait(run_dir: Path, name: str, check: Any, timeout: float, what: str) -> Any:
    """Wait for `check`, failing fast if the process `name` died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = processes.wait_for(check, min(1.0, deadline - time.monotonic()), interval=0.05)
        if result:
            return result
        if processes.read_pid(name, run_dir) is None:
            raise _fail(run_dir, name, f"{name} exited while waiting for {what}")
    raise _fail(run_dir, name, f"timed out after {timeout:.0f} s waiting for {what}")


def _write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> None:
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubelora-local", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "kubelora-local", "context": {"cluster": "kubelora-local", "user": "admin"}}],
        "current-context": "kubelora-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def _crd_documents(crd_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    if not crd_dir.is_dir():
        return docs
    for file in sorted(crd_dir.iterdir()):
        if file.suffix in {".yaml", ".yml", ".json"}:
            for doc in yaml.safe_load_all(file.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    docs.append((file, doc))
    return docs


def apply_crds(kube: Kube, crd_dir: Path, timeout: float = 30.0) -> list[str]:
    """Create (or replace) every CRD found in `crd_dir` and wait until each is Established."""
    names = []
    for file, doc in _crd_documents(crd_dir):
        version = doc.get("apiVersion", "apiextensions.k8s.io/v1")
        base = f"/apis/{version}/customresourcedefinitions"
        name = doc["metadata"]["name"]
        try:
            try:
                kube.create(base, doc)
            except KubeError as e:
                if e.status != 409:
                    raise
                current = kube.get(f"{base}/{name}")
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                kube.request("PUT", f"{base}/{name}", doc)
        except KubeError as e:
            raise ClusterError(f"the API server rejected the CRD in {file}: {e}") from e
        names.append(name)

    def established(name: str) -> bool:
        crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conds = crd.get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    for name in names:
        if not processes.wait_for(functools.partial(established, name), timeout, interval=0.05):
            raise ClusterError(f"CRD {name} not Established after {timeout} s")
    return names


def _default_sa_ready(kube: Kube) -> bool:
    try:
        kube.get("/api/v1/namespaces/default/serviceaccounts/default")
        kube.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")  # every pod's token volume needs it
    except KubeError as e:
        if e.status == 404:
            return False
        raise
    return True


def _node_ready(kube: Kube) -> bool:
    node = kube.get(f"/api/v1/nodes/{NODE_NAME}")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


def is_running(state_dir: Path | None = None) -> bool:
    """True when every component is alive and the API server answers /readyz."""
    state = Path(state_dir or default_state_dir())
    if any(processes.read_pid(n, state / "run") is None for n in COMPONENTS):
        return False
    try:
        info = load(state)
        return info.client().text("/readyz", timeout=3) == "ok"
    except Exception:
        return False


def up(
    state_dir: Path | None = None,
    crd_dir: Path | None = None,
    build_if_missing: bool = True,
    timeout: float = 90.0,
    pod_subnet: str = DEFAULT_SUBNET,
    gpus: int = 0,
) -> ClusterInfo:
    """Start a fresh cluster and return once Pods can run on the local node.

    If a healthy cluster already runs in `state_dir`, it is reused as is (idempotent `up`).
    """
    state = Path(state_dir or default_state_dir()).resolve()
    crds = Path(crd_dir or os.environ.get("KUBELORA_CRD_DIR") or repo_root() / "crds")
    if is_running(state):
        return load(state)
    down(state)
    if not build.binaries_present():
        if not build_if_missing:
            raise ClusterError("the cluster's binaries are not cached; run `kubelora-local build`")
        build.build()
    if not shutil.which("openssl") or not shutil.which("unshare"):
        build.ensure_runtime_packages()

    try:
        return _start(state, crds, timeout, pod_subnet, gpus)
    except BaseException:
        down(state)  # never leave half a cluster behind; logs stay in <state>/run
        raise


def _start(state: Path, crds: Path, timeout: float, pod_subnet: str, gpus: int) -> ClusterInfo:
    state.mkdir(parents=True, exist_ok=True)
    for sub in FRESH_DIRS:
        shutil.rmtree(state / sub, ignore_errors=True)
    run = state / "run"
    run.mkdir()
    network = PodNetwork(pod_subnet)
    (run / "subnet").write_text(pod_subnet)  # first, so that `down` finds the bridge whatever happens next
    network.create_bridge()
    keys = pki.generate(state / "pki", extra_ips=[network.gateway])
    etcd_port, peer_port, api_port = processes.free_port(), processes.free_port(), processes.free_port()
    etcd_dir = state / "etcd"
    etcd_dir.mkdir(mode=0o700)

    etcd = [
        "--name=kubelora",
        f"--data-dir={etcd_dir}",
        f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
        f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=kubelora=http://127.0.0.1:{peer_port}",
        "--log-level=warn",
        "--unsafe-no-fsync",  # a throwaway test cluster: fsync only costs time
    ]
    processes.spawn("etcd", [str(build.binary("etcd")), *etcd], run)
    apiserver = [
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--bind-address={network.gateway}",  # the node's address: host clients and pods alike
        f"--secure-port={api_port}",
        f"--advertise-address={network.gateway}",
        f"--tls-cert-file={keys.server_crt}",
        f"--tls-private-key-file={keys.server_key}",
        f"--client-ca-file={keys.ca_crt}",
        f"--token-auth-file={keys.tokens_csv}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={keys.sa_pub}",
        f"--service-account-signing-key-file={keys.sa_key}",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--authorization-mode=RBAC",
        "--endpoint-reconciler-type=none",  # else it logs "loopback range" errors every 10 s
        "--allow-privileged=true",
        "--profiling=false",
        # Webhooks behind a Service are called at an endpoint's pod IP: there is no kube-proxy.
        "--enable-aggregator-routing=true",
    ]
    processes.spawn("kube-apiserver", [str(build.binary("kube-apiserver")), *apiserver], run)

    server = f"https://{network.gateway}:{api_port}"
    info = ClusterInfo(
        state_dir=str(state),
        kubeconfig=str(state / "kubeconfig"),
        server=server,
        token=keys.admin_token,
        ca_file=str(keys.ca_crt),
        apiserver_port=api_port,
        etcd_port=etcd_port,
        pod_subnet=pod_subnet,
        gpus=gpus,
    )
    kube = info.client()
    _wait(run, "kube-apiserver", lambda: kube.text("/readyz", timeout=2) == "ok", timeout, "/readyz")
    _write_kubeconfig(Path(info.kubeconfig), server, keys.ca_crt, keys.admin_token)
    (state / "cluster.json").write_text(json.dumps(asdict(info), indent=2))
    apply_crds(kube, crds)
    kube.create("/apis/storage.k8s.io/v1/storageclasses", provisioner.storage_class())

    kcm = [
        f"--kubeconfig={info.kubeconfig}",
        "--leader-elect=false",
        "--secure-port=0",  # no fixed *:10257 listener, so several clusters can coexist
        f"--flex-volume-plugin-dir={run / 'flexvolume'}",  # else it creates /usr/libexec/kubernetes/...
        f"--service-account-private-key-file={keys.sa_key}",  # runs the SA token controller
        f"--root-ca-file={keys.ca_crt}",
        "--cluster-cidr=10.244.0.0/16",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
    ]
    processes.spawn("kube-controller-manager", [str(build.binary("kube-controller-manager")), *kcm], run)
    _wait(run, "kube-controller-manager", lambda: _default_sa_ready(kube), timeout, "SA default/default")
    scheduler = [
        f"--kubeconfig={info.kubeconfig}",
        "--leader-elect=false",
        "--secure-port=0",  # no fixed *:10259 listener
        "--kube-api-qps=200",
        "--kube-api-burst=400",
    ]
    processes.spawn("kube-scheduler", [str(build.binary("kube-scheduler")), *scheduler], run)
    _start_dns(info, run, timeout)

    runner_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    processes.spawn(
        "runner",
        [sys.executable, "-m", "kubelora_local.runner", "--state-dir", str(state)],
        run,
        env=runner_env,
    )
    _wait(run, "runner", lambda: _node_ready(kube), timeout, f"node {NODE_NAME} Ready")
    return info


def _start_dns(info: ClusterInfo, run: Path, timeout: float) -> None:
    """CoreDNS with the kubernetes plugin on <subnet>.254:53, what every pod's resolv.conf names."""
    ready_port = processes.free_port()
    corefile = run / "Corefile"
    corefile.write_text(
        f""".:53 {{
    bind {info.dns_ip}
    ready 127.0.0.1:{ready_port}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {info.kubeconfig} kubelora-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
"""
    )
    processes.spawn("coredns", [str(build.binary("coredns")), "-conf", str(corefile)], run)
    _wait(run, "coredns", lambda: _http_ok(f"http://127.0.0.1:{ready_port}/ready"), timeout, "CoreDNS ready")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def down(state_dir: Path | None = None) -> list[str]:
    """Stop every component by PID (runner, KCM, apiserver, etcd); returns the ones that ran."""
    state = Path(state_dir or default_state_dir())
    run = state / "run"
    stopped = []
    for name in COMPONENTS:
        if processes.stop(name, run, timeout=20 if name == "runner" else 10):
            stopped.append(name)
        if name == "runner":
            _kill_leftover_containers(state)
    with contextlib.suppress(FileNotFoundError):
        PodNetwork((run / "subnet").read_text().strip()).delete_bridge()
    return stopped


def restart_apiserver(state_dir: Path | None = None, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
    """Stop kube-apiserver, keep it down ``down_seconds``, start it with the same flags, wait for /readyz."""
    state = Path(state_dir or default_state_dir())
    run = state / "run"
    argv = json.loads((run / "kube-apiserver.argv").read_text())
    processes.stop("kube-apiserver", run)
    time.sleep(down_seconds)
    processes.spawn("kube-apiserver", argv, run)
    kube = load(state).client()
    _wait(run, "kube-apiserver", lambda: kube.text("/readyz", timeout=2) == "ok", timeout, "/readyz after restart")


def _kill_leftover_containers(state: Path) -> None:
    """Container processes survive a runner that was SIGKILLed or crashed: kill their groups."""
    for pid_file in (state / "pods").glob("*/*/containers/*/pid"):
        pid = processes.pid_from_file(pid_file)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
    for netns_file in (state / "pods").glob("*/*/netns"):
        delete_netns(netns_file.read_text().strip())


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """PID (or None) per component, API readiness and node readiness."""
    state = Path(state_dir or default_state_dir())
    result: dict[str, Any] = {n: processes.read_pid(n, state / "run") for n in COMPONENTS}
    result["apiserver_ready"] = False
    result["node_ready"] = False
    try:
        kube = load(state).client()
        result["apiserver_ready"] = kube.text("/readyz", timeout=3) == "ok"
        result["node_ready"] = _node_ready(kube)
    except Exception:
        pass
    return result
