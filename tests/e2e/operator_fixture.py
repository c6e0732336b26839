"""Session fixture ``operator``: the real ``kubelora-operator`` as a subprocess against the local cluster.

Loaded as a pytest plugin from the root conftest.py, so every e2e module shares one operator. It
runs cluster-wide and standalone (no peering), with its liveness endpoint on a free local port,
which is also how the fixture knows it is up: kopf serves it only after the startup handlers ran.
Tests that need a crash call :meth:`OperatorProcess.kill` (SIGKILL, no cleanup) and then
:meth:`OperatorProcess.start` (in a ``finally``, so later tests find it running). The operator's
output goes to a log file: ``operator.log_path``, ``operator.tail()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

START_TIMEOUT = 60.0
STARTED: list[OperatorProcess] = []
"""The session operator once its fixture ran (the fixture is lazy: only tests that need it start it)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OperatorProcess:
    """Start, stop, kill and inspect one ``kubelora-operator`` process."""

    kubeconfig: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=lambda: [sys.executable, "-m", "kubelora"])
    """The command before the flags; benchmarks swap in a profiling wrapper."""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    """Where ``/metrics`` is served (a free port per start)."""
    starts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Launch and wait until the liveness endpoint answers; fail with the log tail otherwise."""
        if self.running:
            return
        self.port = _free_port()
        self.metrics_port = _free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "OMP_NUM_THREADS": "1", **self.env}
        argv = [*self.launcher, "-A", "--liveness", f"http://127.0.0.1:{self.port}/healthz",
                "--metrics-port", str(self.metrics_port), *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubelora-operator exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"kubelora-operator not healthy after {START_TIMEOUT} s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        """The operator's ``/metrics`` page (Prometheus text format)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM, as Kubernetes does), SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """Crash: SIGKILL, no cleanup handlers, in-flight requests lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the process (SIGSTOP) so that no reconcile writes in between; SIGCONT after."""
        pid = self.pid
        if pid is None:
            yield
            return
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def rss_bytes(self) -> int:
        """Resident memory of the operator process (0 when not running)."""
        pid = self.pid
        if pid is None:
            return 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])


REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".venv" / "bin" / "helm"
OPERATOR_NAMESPACE = "kubelora-system"
RELEASE = "e2e"
"""Release name for the chart's RBAC (its names are ``<release>-operator...``; the Helm tests use others)."""
RBAC_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}


@dataclass(frozen=True)
class ChartIdentity:
    service_account: str
    token: str
    kubeconfig: Path


def chart_rbac() -> list[dict[str, Any]]:
    """The chart's ServiceAccount and RBAC objects, rendered with default values as ``helm install`` would."""
    out = subprocess.run(
        [str(HELM), "template", RELEASE, str(REPO / "charts" / "kubelora"), "--namespace", OPERATOR_NAMESPACE,
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session")
def chart_identity(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> ChartIdentity:
    """The chart's ServiceAccount with the chart's ClusterRoles, a token for it (TokenRequest) and a kubeconfig
    with that token: the e2e operator runs as the chart installs it, not with the admin token."""
    from kubelora_local.kube import KubeError

    with contextlib.suppress(KubeError):  # a reused cluster has it already
        cluster.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": OPERATOR_NAMESPACE}})
    account = ""
    for doc in chart_rbac():
        path = RBAC_PATHS[doc["kind"]].format(ns=OPERATOR_NAMESPACE)
        account = doc["metadata"]["name"] if doc["kind"] == "ServiceAccount" else account
        try:
            cluster.kube.create(path, doc)
        except KubeError as e:
            if e.status != 409:
                raise
            cluster.kube.request("PUT", f"{path}/{doc['metadata']['name']}", doc)  # unconditional update
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 24 * 3600}}
    token = cluster.kube.create(
        f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{account}/token", request)["status"]["token"]
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["users"] = [{"name": config["contexts"][0]["context"]["user"], "user": {"token": token}}]
    path = tmp_path_factory.mktemp("identity") / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return ChartIdentity(service_account=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}", token=token,
                         kubeconfig=path)


@pytest.fixture(scope="session")
def operator(chart_identity: ChartIdentity, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator for the whole session, as the chart's ServiceAccount; tests that kill it start it again
    (``operator.start()``)."""
    proc = OperatorProcess(
        kubeconfig=chart_identity.kubeconfig,
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        env={"KUBELORA_PROGRESS_INTERVAL_SECONDS": "1"},
    )  # live progress in short runs
    try:
        proc.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    STARTED.append(proc)
    yield proc
    STARTED.remove(proc)
    proc.stop()


@pytest.fixture
def no_reconciles() -> Iterator[None]:
    """For tests that write status by hand: the session operator, if a test before started it, is paused
    for the test, so what the API server decides is not raced by a reconcile rewriting that status."""
    with contextlib.ExitStack() as stack:
        for proc in STARTED:
            stack.enter_context(proc.paused())
        yield
