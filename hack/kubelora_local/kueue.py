"""Run the real Kueue v0.17.0 controller manager against the local cluster, as a host process.

In a real install Kueue is a Deployment in `kueue-system` behind a webhook Service, with
certificates it generates itself and writes into a Secret. Here it is one host process (like the
controller-manager) talking to the API server with the cluster's admin kubeconfig, so this module
does what the Deployment, its Service, its Secret and kustomize do:

- CRDs from the module's `config/components/crd/bases`, with the conversion webhooks that
  upstream's kustomization patches in, pointed at the process;
- a serving certificate (openssl, SAN = the node IP) in the webhook certDir, since the internal
  cert management would want a Service DNS name and a Secret;
- the webhook configurations from `config/components/webhook/manifests.yaml`, rewritten from
  `clientConfig.service` to `clientConfig.url: https://<node_ip>:<port><path>`: the API server runs
  on the host and reaches the node IP directly. Only Kueue's own objects and the enabled
  integrations keep their webhooks: the pod/deployment/statefulset ones (failurePolicy Fail) would
  put every pod create in the cluster behind this one test process.

`stop()` removes the webhook configurations before stopping the process, so that nothing is
rejected by a webhook nobody serves. The CRDs stay (objects of them may still hold Kueue's
finalizers); the next `start` replaces them.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import shlex
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import build, processes
from .cluster import ClusterInfo, apply_crds
from .kube import Kube, KubeError

NAME = "kueue"
MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"  # what the Configuration names: MultiKueue secrets, excluded from pod integrations
FRAMEWORKS = ("batch/job",)
# cmd/kueue/main.go reads the metrics serving cert from this fixed path whenever internal cert
# management is off (certwatcher.New fails at start if it is missing); we bind-mount our cert
# directory there in a private mount namespace.
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"
# The CRDs whose conversion webhook config/components/crd/kustomization.yaml enables.
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# Webhooks kept from Kueue's manifests, by (apiGroup, resource) of their rules: Kueue's objects
# and the integrations in FRAMEWORKS.
WEBHOOK_RESOURCES = {("kueue.x-k8s.io", "*"), ("batch", "jobs")}
_ADMISSION = "/apis/admissionregistration.k8s.io/v1"
_WEBHOOK_KINDS = {
    "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
}


class KueueError(RuntimeError):
    """Kueue did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class KueueHandle:
    """A running Kueue: where its files are, its ports, and the webhook configurations it owns."""

    info: ClusterInfo
    work_dir: Path
    webhook_port: int
    health_port: int
    metrics_port: int
    webhook_configs: tuple[str, ...]  # API paths of the (Mutating|Validating)WebhookConfigurations

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{NAME}.log"

    @property
    def pid(self) -> int | None:
        return processes.read_pid(NAME, self.work_dir)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Remove the webhook configurations first (else creates fail against a dead URL), then the process."""
        kube = self.info.client()
        for path in self.webhook_configs:
            try:
                kube.delete(path)
            except KubeError as e:
                if e.status != 404:
                    raise
        processes.stop(NAME, self.work_dir, timeout=10)


def module_dir() -> Path:
    """Where Go's module cache holds Kueue's source (CRDs, webhook manifests) for hack/kueue's pin."""
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    out = subprocess.run(
        [build._go(), "list", "-m", "-f", "{{.Dir}}", MODULE],
        cwd=build.PROGRAMS[NAME].module_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return Path(out.stdout.strip())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def serving_cert(cert_dir: Path, ip: str) -> bytes:
    """A CA and a tls.crt/tls.key for `ip` in `cert_dir` (the names controller-runtime reads); returns the CA PEM.

    EC keys as in pki.py: milliseconds to generate. The API server verifies the webhook against
    the returned CA, and Go checks IP SANs only, hence the SAN.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert_dir.chmod(0o700)
    d = cert_dir
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "365", "-subj", "/CN=kueue-ca", cwd=d)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "tls.key", cwd=d)
    _openssl("req", "-new", "-key", "tls.key", "-out", "tls.csr", "-subj", "/CN=kueue-webhook", cwd=d)
    (d / "tls.ext").write_text(f"subjectAltName=IP:{ip},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "365", "-extfile", "tls.ext", cwd=d,
    )  # fmt: skip
    for key in ("ca.key", "tls.key"):
        (d / key).chmod(0o600)
    return (d / "ca.crt").read_bytes()


def configuration(
    node_ip: str, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path
) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2, decoded strictly: unknown fields fail the start).

    Field names as in apis/config/v1beta2/configuration_types.go of v0.17.0. One replica, so no
    leader election; probes and metrics on loopback ports so that sessions never collide; the
    visibility server (an aggregated API on a fixed port 8082 of all interfaces, with certs from
    /visibility) is off because nothing here registers its APIService.
    """
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": node_ip, "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
    }


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def write_crds(src: Path, dest: Path, webhook_base: str, ca_pem: bytes) -> Path:
    """Copy Kueue's CRDs to `dest`, adding upstream's conversion webhooks (at `webhook_base`/convert)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in sorted((src / "config" / "components" / "crd" / "bases").glob("*.yaml")):
        docs = _yaml_docs(file)
        for doc in docs:
            if doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["names"]["plural"] in CONVERSION_CRDS:
                doc["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {
                            "url": f"{webhook_base}/convert",
                            "caBundle": base64.b64encode(ca_pem).decode(),
                        },
                        "conversionReviewVersions": ["v1"],
                    },
                }
        (dest / file.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return dest


def _kept(webhook: dict[str, Any]) -> bool:
    """Whether a webhook from the manifests serves Kueue's objects or an enabled integration."""
    for rule in webhook.get("rules") or []:
        for group in rule.get("apiGroups") or []:
            if (group, "*") in WEBHOOK_RESOURCES or any((group, r) in WEBHOOK_RESOURCES for r in rule["resources"]):
                return True
    return False


def webhook_configurations(src: Path, webhook_base: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, named as upstream's kustomize does (`kueue-` prefix), called by URL."""
    result = []
    for doc in _yaml_docs(src / "config" / "components" / "webhook" / "manifests.yaml"):
        if doc.get("kind") not in _WEBHOOK_KINDS:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
        doc["webhooks"] = [w for w in doc["webhooks"] if _kept(w)]
        for w in doc["webhooks"]:
            path = w["clientConfig"]["service"]["path"]
            w["clientConfig"] = {"url": f"{webhook_base}{path}", "caBundle": base64.b64encode(ca_pem).decode()}
        result.append(doc)
    return result


def _create_or_replace(kube: Kube, collection: str, obj: dict[str, Any]) -> str:
    """POST, or PUT over what an earlier run left; returns the object's path."""
    path = f"{collection}/{obj['metadata']['name']}"
    try:
        kube.create(collection, obj)
    except KubeError as e:
        if e.status != 409:
            raise
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": kube.get(path)["metadata"]["resourceVersion"]}}
        kube.request("PUT", path, obj)
    return path


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _probe_job(queue: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "kueue-probe-", "labels": {"kueue.x-k8s.io/queue-name": queue}},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "ghcr.io/kubelora/noop", "command": ["true"]}],
                }
            }
        },
    }


def webhooks_live(kube: Kube) -> bool:
    """True once the API server calls both webhooks: a dry-run queued Job is suspended, a bad queue name denied.

    The API server picks new webhook configurations up asynchronously; without this a Job created
    right after `start` could slip past Kueue unsuspended.
    """
    jobs = "/apis/batch/v1/namespaces/default/jobs"
    dry = {"dryRun": "All"}
    if not kube.request("POST", jobs, _probe_job("probe"), params=dry)["spec"].get("suspend"):
        return False
    try:
        kube.request("POST", jobs, _probe_job("Not_A_Queue"), params=dry)
    except KubeError as e:
        return "denied the request" in str(e)
    return False


def _argv(binary: Path, config_file: Path, cert_dir: Path) -> list[str]:
    """Kueue in a private mount namespace with our cert dir bind-mounted at METRICS_CERT_DIR.

    The host keeps only an empty mount-point directory (as the pod runner's mounts do).
    """
    script = "\n".join(
        [
            "set -e",
            f"mkdir -p {METRICS_CERT_DIR}",
            f"mount --bind {shlex.quote(str(cert_dir))} {METRICS_CERT_DIR}",
            'exec "$@"',
        ]
    )
    kueue = [str(binary), f"--config={config_file}", "--zap-log-level=info"]
    return ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c", script, NAME, *kueue]


def _wait(handle: KueueHandle, check: Any, timeout: float, what: str) -> None:
    """Wait for `check`, failing at once (with the log) if Kueue exited meanwhile."""
    waited = 0.0
    while waited < timeout:
        if processes.wait_for(check, min(1.0, timeout - waited), interval=0.1):
            return
        waited += 1.0
        if handle.pid is None:
            raise KueueError(f"kueue exited while waiting for {what}; {handle.log_path}:\n{handle.log_tail()}")
    raise KueueError(f"timed out after {timeout:.0f} s waiting for {what}; {handle.log_path}:\n{handle.log_tail()}")


def start(info: ClusterInfo, work_dir: Path, timeout: float = 60.0) -> KueueHandle:
    """Install Kueue's CRDs and webhooks and run its controller manager; returns once its webhooks answer.

    Needs the binary (`build.build(("kueue",))`) and root (the mount namespace). Order: CRDs
    (Established) -> process -> /readyz (the webhook server listens) -> webhook configurations ->
    the API server calls them. The webhooks go in last so that nothing is rejected while Kueue starts.
    """
    binary = build.binary(NAME)
    if not os.access(binary, os.X_OK):
        raise KueueError(f"{binary} is not built; run `kubelora-local build kueue`")
    work_dir.mkdir(parents=True, exist_ok=True)
    processes.stop(NAME, work_dir)  # one an interrupted run left on a reused cluster
    kube = info.client()
    src = module_dir()
    ports = {k: processes.free_port() for k in ("webhook", "health", "metrics")}
    base = f"https://{info.node_ip}:{ports['webhook']}"
    cert_dir = work_dir / "certs"
    ca_pem = serving_cert(cert_dir, info.node_ip)
    apply_crds(kube, write_crds(src, work_dir / "crds", base, ca_pem))

    config_file = work_dir / "kueue-config.yaml"
    cfg = configuration(info.node_ip, ports["webhook"], ports["health"], ports["metrics"], cert_dir)
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    configs = webhook_configurations(src, base, ca_pem)
    handle = KueueHandle(
        info=info,
        work_dir=work_dir,
        webhook_port=ports["webhook"],
        health_port=ports["health"],
        metrics_port=ports["metrics"],
        webhook_configs=tuple(f"{_ADMISSION}/{_WEBHOOK_KINDS[c['kind']]}/{c['metadata']['name']}" for c in configs),
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"KUBECONFIG": info.kubeconfig}
    processes.spawn(NAME, _argv(binary, config_file, cert_dir), work_dir, env=env)
    try:
        _wait(handle, functools.partial(_http_ok, f"http://127.0.0.1:{ports['health']}/readyz"), timeout, "/readyz")
        # Validating first: by the time the mutating one answers, both are in the API server.
        for c in sorted(configs, key=lambda c: c["kind"] != "ValidatingWebhookConfiguration"):
            _create_or_replace(kube, f"{_ADMISSION}/{_WEBHOOK_KINDS[c['kind']]}", c)
        _wait(handle, functools.partial(webhooks_live, kube), timeout, "the API server to call Kueue's webhooks")
    except BaseException:
        handle.stop()
        raise
    return handle
