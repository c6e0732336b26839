"""The local cluster's pure pieces: a pod's DNS files, the provisioner's volumes, the Go module pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubelora_local import build
from kubelora_local.network import PodNetwork
from kubelora_local.runner import dns, provisioner


def _pod(**spec: object) -> dict[str, object]:
    return {"metadata": {"name": "train-0-abcde", "namespace": "team-a", "uid": "u1"}, "spec": dict(spec)}


def test_indexed_job_pod_is_named_by_hostname_and_subdomain() -> None:
    pod = _pod(hostname="train-0", subdomain="workers")
    assert dns.hostname(pod) == "train-0"
    assert dns.fqdn(pod) == "train-0.workers.team-a.svc.cluster.local"
    assert dns.hosts_file(pod, "10.244.3.7").splitlines()[-1] == (
        "10.244.3.7\ttrain-0.workers.team-a.svc.cluster.local train-0"
    )


def test_plain_pod_is_named_after_itself_without_a_domain_name() -> None:
    pod = _pod()
    assert dns.hostname(pod) == "train-0-abcde"
    assert dns.fqdn(pod) is None
    assert dns.hosts_file(pod, "10.244.3.7").splitlines()[-1] == "10.244.3.7\ttrain-0-abcde"


def test_long_pod_names_become_a_valid_hostname() -> None:
    pod = {"metadata": {"name": "a" * 62 + "-b" + "c" * 10, "namespace": "n"}, "spec": {}}
    assert dns.hostname(pod) == "a" * 62  # cut to 63 and no trailing '-'


def test_cluster_first_pods_search_their_namespace_first() -> None:
    conf = dns.resolv_conf(_pod(), "10.244.3.1")
    assert conf == (
        "search team-a.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.244.3.1\noptions ndots:5\n"
    )


@pytest.mark.parametrize("spec", [{"dnsPolicy": "Default"}, {"hostNetwork": True}])
def test_default_dns_policy_and_host_network_keep_the_hosts_resolver(spec: dict[str, object]) -> None:
    assert dns.resolv_conf(_pod(**spec), "10.244.3.1") is None


def test_provisioned_volume_is_prebound_to_its_claim() -> None:
    claim = {
        "metadata": {"name": "data", "namespace": "team-a", "uid": "c-123"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "5Gi"}},
            "storageClassName": provisioner.STORAGE_CLASS,
        },
    }
    pv = provisioner.volume_for(claim, Path("/state/pvcs/team-a/data"))
    assert pv["metadata"]["name"] == "pvc-c-123"
    assert pv["spec"]["claimRef"] == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "namespace": "team-a",
        "name": "data",
        "uid": "c-123",
    }
    assert pv["spec"]["capacity"] == {"storage": "5Gi"}
    assert pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["hostPath"]["path"] == "/state/pvcs/team-a/data"
    assert provisioner.storage_class()["provisioner"] == pv["metadata"]["annotations"][provisioner.PROVISIONED_BY]


def test_pod_network_names_fit_linux_interface_names() -> None:
    net = PodNetwork("10.244.213")
    assert net.gateway == "10.244.213.1"
    assert len(net.bridge) <= 15 and net.bridge != PodNetwork("10.245.213").bridge != PodNetwork("10.244.21").bridge
    assert len(net.netns_name("0123456789abcdef-uid")) <= 15


def test_kubernetes_module_pins_one_release_for_every_staging_module() -> None:
    gomod = (build.PROGRAMS["kube-apiserver"].module_dir / "go.mod").read_text()
    assert re.search(r"^\s*(require\s+)?k8s\.io/kubernetes v1\.37\.2( // indirect)?$", gomod, re.M)
    replaced = re.findall(r"^\s+(k8s\.io/\S+) => (k8s\.io/\S+) (v\S+)$", gomod, re.M)
    assert len(replaced) > 30
    assert all(src == dst and version == "v0.37.2" for src, dst, version in replaced)
    # Every k8s.io module the build resolves is at that release (a stray one would mix API versions).
    gosum = (build.PROGRAMS["kube-apiserver"].module_dir / "go.sum").read_text()
    staged = {src for src, _, _ in replaced}
    versions = {v for m, v in re.findall(r"^(k8s\.io/[^\s]+) (v[^\s/]+)[\s/]", gosum, re.M) if m in staged}
    assert versions == {"v0.37.2"}


def test_cache_key_changes_when_a_module_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "hack" / "tool"
    module.mkdir(parents=True)
    (module / "go.mod").write_text("module x\n")
    (module / "main.go").write_text("package main\n")
    (module / "README.md").write_text("notes\n")
    monkeypatch.setattr(build, "repo_root", lambda: tmp_path)
    program = build.Program("tool", "tool", ".", "v1.0.0")
    first = program.digest()
    (module / "README.md").write_text("other notes\n")
    assert program.digest() == first  # docs do not force a rebuild
    (module / "main.go").write_text("package main // changed\n")
    assert program.digest() != first
    assert program.path().parent.name == f"tool-v1.0.0-{program.digest()}"


def test_sigkill_reaches_children_that_left_the_container_process_group(tmp_path: Path) -> None:
    """torchrun starts each worker in a new session; a container kill must still take them (cgroup kill)."""
    import signal
    import subprocess
    import sys
    import time

    from kubelora_local.runner.sandbox import descendants, signal_group

    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            f"open({str(marker)!r}, 'w').write(str(c.pid))\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 20
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(marker.read_text())
    assert child in descendants(parent.pid)
    signal_group(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the worker outlived its container"
        time.sleep(0.05)
