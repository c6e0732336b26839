"""Operator scale: apply N LoRAJobs (image ghcr.io/kubelora/noop) and measure what the operator does.

    OMP_NUM_THREADS=1 .venv/bin/python bench/operator_scale.py --count 1000

On a fresh local cluster (``kubelora-local``; the noop image "runs" by exiting 0 at once) it starts the
real ``kubelora-operator``, creates N LoRAJobs from a few client threads and reports:

* seconds from the first create until every pre-flight Job and every training Job exists, and until
  every LoRAJob reached a final phase (noop writes no TrainerResult, so runs end Failed by design);
* the operator's peak and idle RSS and its CPU seconds;
* writes seen in the namespace, by kind (watch events, so they include every writer; during the run
  the controller-manager and the pod runner write Jobs and Pods too), per LoRAJob;
* watch events per minute in the namespace once idle, i.e. writes at steady state (target: zero).

Targets (issue #6): <= 60 s until all Jobs exist for 1,000, RSS <= 200 MB, no writes when idle.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelora_local import cluster as local_cluster
from kubelora_local.kube import Kube, KubeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.e2e

from tests.e2e.operator_fixture import OperatorProcess
from tests.reliability.orphans import create_lorajobs, delete_all_lorajobs, left

NS = "scale"
WATCHED = {  # kind -> collection path in the namespace
    "LoRAJob": f"/apis/kubelora.io/v1alpha1/namespaces/{NS}/lorajobs",
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Pod": f"/api/v1/namespaces/{NS}/pods",
    "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
    "ServiceAccount": f"/api/v1/namespaces/{NS}/serviceaccounts",
    "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
    "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings",
    "Event": f"/api/v1/namespaces/{NS}/events",
}
FINAL = ("Succeeded", "Failed")


@dataclass
class Recorder:
    """Counts watch events per (kind, type) and notes when each Job first appeared."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    jobs_seen: dict[str, float] = field(default_factory=dict)
    jobs_done: dict[str, float] = field(default_factory=dict)
    """When each Job's pod succeeded (by job name): the operator's cue for the next step."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def follow(self, kube: Kube, kind: str, path: str) -> None:
        version = kube.get(path, limit=1)["metadata"]["resourceVersion"]
        while not self.stop.is_set():
            try:
                for event in kube.watch(path, version, timeout_seconds=30):
                    obj = event.get("object", {})
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event["type"] == "BOOKMARK":
                        continue
                    with self.lock:
                        self.counts[(kind, event["type"])] += 1
                        name = obj.get("metadata", {}).get("name", "")
                        if kind == "Job" and event["type"] == "ADDED":
                            self.jobs_seen.setdefault(name, time.monotonic())
                        if kind == "Pod" and (obj.get("status") or {}).get("phase") == "Succeeded":
                            job = obj["metadata"].get("labels", {}).get("job-name", "")
                            self.jobs_done.setdefault(job, time.monotonic())
                    if self.stop.is_set():
                        return
            except Exception as exc:  # 410 Gone, a dropped stream, or the cluster going down at the end
                if self.stop.is_set():
                    return
                if not isinstance(exc, KubeError) or exc.status != 410:
                    time.sleep(0.5)
                version = kube.get(path, limit=1)["metadata"]["resourceVersion"]

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self.lock:
            return Counter(self.counts)


CLAIMS = ("models", "data", "adapters")


def lorajob(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "metadata": {"name": name}, "spec": {
        "image": "ghcr.io/kubelora/noop", "method": "lora", "resources": {"gpus": 0},
        "baseModel": {"uri": "pvc://models/tiny"}, "dataset": {"uri": "pvc://data/chat.jsonl"},
        "output": {"uri": f"pvc://adapters/{name}"}}}


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime in clock ticks (100 Hz)


def wait_until(check: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic()
        except KubeError:
            pass  # not there yet
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def run(count: int, idle_seconds: float, creators: int, state_dir: Path,
        launcher: list[str] | None = None) -> dict[str, Any]:
    local_cluster.down(state_dir)  # always a fresh cluster: `up` would reuse a healthy one
    info = local_cluster.up(state_dir)
    try:
        return _measure(info, count, idle_seconds, creators, state_dir, launcher)
    finally:
        local_cluster.down(state_dir)


def _measure(info: local_cluster.ClusterInfo, count: int, idle_seconds: float, creators: int, state_dir: Path,
             launcher: list[str] | None) -> dict[str, Any]:
    kube = info.client()
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    # What a pod's projected token volume needs (v1.24+ has no token Secrets): the SA and the root CA.
    wait_until(lambda: kube.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default")
               and kube.get(f"/api/v1/namespaces/{NS}/configmaps/kube-root-ca.crt"), 30, "the namespace's SA")
    for claim in CLAIMS:  # the scheduler keeps a pod whose claim does not exist Pending
        kube.create(f"/api/v1/namespaces/{NS}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    operator = OperatorProcess(kubeconfig=Path(info.kubeconfig), log_path=state_dir / "operator.log")
    if launcher:
        operator.launcher = launcher
    operator.start()
    try:
        return _drive(info, kube, operator, count, idle_seconds, creators)
    finally:
        operator.stop()


def _drive(info: local_cluster.ClusterInfo, kube: Kube, operator: OperatorProcess, count: int, idle_seconds: float,
           creators: int) -> dict[str, Any]:
    recorder = Recorder()
    threads = [threading.Thread(target=recorder.follow, args=(info.client(), kind, path), daemon=True)
               for kind, path in WATCHED.items()]
    for thread in threads:
        thread.start()
    time.sleep(1)
    start_rss = peak_rss = operator.rss_bytes()
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak_rss
        while not sampling.is_set():
            peak_rss = max(peak_rss, operator.rss_bytes())
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    cpu0 = cpu_seconds(operator.pid)
    t0 = time.monotonic()
    create_lorajobs(kube, NS, [lorajob(f"lj-{i:05d}") for i in range(count)], threads=creators)
    t_created = time.monotonic()

    def jobs(prefix: str) -> int:
        with recorder.lock:
            return sum(1 for name in recorder.jobs_seen if prefix in name)

    t_preflight = wait_until(lambda: jobs("-validate-") >= count, 600, "every pre-flight Job")
    t_training = wait_until(lambda: jobs("-train-") >= count, 600, "every training Job")

    def final() -> bool:
        items = kube.get(WATCHED["LoRAJob"])["items"]
        return sum(1 for i in items if (i.get("status") or {}).get("phase") in FINAL) >= count

    t_final = wait_until(final, 900, "every LoRAJob to finish")
    cpu_run = cpu_seconds(operator.pid) - cpu0
    during = recorder.snapshot()
    time.sleep(10)  # let stragglers (kopf's event posting, GC) settle before the idle window
    before = recorder.snapshot()
    cpu_idle0 = cpu_seconds(operator.pid)
    time.sleep(idle_seconds)
    idle = recorder.snapshot() - before
    cpu_idle = cpu_seconds(operator.pid) - cpu_idle0
    idle_rss = operator.rss_bytes()
    sampling.set()
    recorder.stop.set()
    phases = Counter((i.get("status") or {}).get("phase") for i in kube.get(WATCHED["LoRAJob"])["items"])
    # All of them deleted at once (one collection DELETE): the garbage collector and the operator must leave
    # no child behind.
    t_delete = time.monotonic()
    delete_all_lorajobs(kube, NS)
    deadline = t_delete + 600
    while (remaining := left(kube, NS)) and time.monotonic() < deadline:
        time.sleep(1)
    t_gone = time.monotonic()
    lags = sorted(recorder.jobs_seen[name.replace("-validate-", "-train-")] - done
                  for name, done in recorder.jobs_done.items()
                  if "-validate-" in name and name.replace("-validate-", "-train-") in recorder.jobs_seen)
    last_preflight_done = max(t for n, t in recorder.jobs_done.items() if "-validate-" in n)
    return {
        "count": count,
        "deleted_all_gone_seconds": round(t_gone - t_delete, 1),
        "left_after_delete": remaining,
        "last_preflight_pod_done_seconds": round(last_preflight_done - t0, 1),
        "operator_reaction_p50_seconds": round(lags[len(lags) // 2], 2),
        "operator_reaction_p99_seconds": round(lags[int(len(lags) * 0.99)], 2),
        "create_seconds": round(t_created - t0, 1),
        "all_preflight_jobs_seconds": round(t_preflight - t0, 1),
        "all_training_jobs_seconds": round(t_training - t0, 1),
        "all_final_seconds": round(t_final - t0, 1),
        "final_phases": dict(phases),
        "operator_start_rss_mb": round(start_rss / 2**20, 1),
        "operator_peak_rss_mb": round(peak_rss / 2**20, 1),
        "operator_idle_rss_mb": round(idle_rss / 2**20, 1),
        "operator_cpu_seconds_run": round(cpu_run, 1),
        "operator_cpu_seconds_idle": round(cpu_idle, 2),
        "writes_during_run": {f"{k} {t}": n for (k, t), n in sorted(during.items())},
        "lorajob_writes_per_job": round(during[("LoRAJob", "MODIFIED")] / count, 2),
        "idle_window_seconds": idle_seconds,
        "idle_writes_per_minute": round(sum(idle.values()) * 60 / idle_seconds, 2),
        "idle_writes": {f"{k} {t}": n for (k, t), n in sorted(idle.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--creators", type=int, default=8, help="client threads creating LoRAJobs")
    parser.add_argument("--state-dir", type=Path, default=None, help="cluster state (default: a temp dir)")
    parser.add_argument("--launcher", default="", help="command that runs the operator, e.g. a profiler wrapper")
    args = parser.parse_args()
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="operator-scale-"))
    launcher = args.launcher.split() or None
    print(json.dumps(run(args.count, args.idle_seconds, args.creators, state, launcher), indent=2))


if __name__ == "__main__":
    main()
