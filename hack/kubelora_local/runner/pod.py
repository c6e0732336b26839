"""One thread per Pod: set up volumes, run init then main containers, report status, tear down.

The worker owns everything about its pod after binding: it is the only writer of the pod's status
(merge patches, only when something changed) and it finishes a graceful deletion by deleting the
Pod with grace 0, exactly what the kubelet does, so ReplicaSets and Jobs see pods disappear.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from ..kube import KubeError
from . import dns
from .container import Container, unsupported_image_message
from .context import ConfigError, Obj, RunnerContext, now
from .envvars import container_env
from .sandbox import wrap
from .volumes import Mount, PodVolumes

log = logging.getLogger("kubelora.runner")
TICK = 0.1
REFRESH_EVERY = 3.0
HOST_CPUS = os.cpu_count() or 1
HOST_MEM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _terminal(phase: str) -> bool:
    return phase in ("Succeeded", "Failed")


class PodWorker(threading.Thread):
    """Runs one Pod to completion or deletion."""

    def __init__(self, ctx: RunnerContext, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.path = f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}"
        self.policy: str = pod["spec"].get("restartPolicy", "Always")
        pod_dir = ctx.pod_dir(pod)

        def make(spec: Obj) -> Container:
            return Container(spec, pod_dir / "containers" / spec["name"], ctx.log_path(pod, spec["name"]))

        self.inits = [make(c) for c in pod["spec"].get("initContainers") or []]
        self.containers = [make(c) for c in pod["spec"].get("containers") or []]
        self.ip = ""
        self.netns: str | None = None
        self.volumes: PodVolumes | None = None
        self.phase = "Pending"
        self.start_time = now()
        self.conditions: dict[str, Obj] = {}
        self._wake = threading.Event()
        self._deleting = False
        self._shutdown = False
        self._last_status = ""
        self._last_refresh = -10.0
        self.finished = threading.Event()

    # --- called from the watch thread -------------------------------------------------------
    def update(self, pod: Obj) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self._deleting = True
            self._wake.set()

    def shutdown(self) -> None:
        """Runner is stopping: kill processes, leave the Pod object alone."""
        self._shutdown = True
        self._wake.set()

    # --- the worker ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.ns, self.pod_name)
            for c in self.inits + self.containers:
                c.kill()
        finally:
            if self.ctx.network is not None:
                self.ctx.network.detach(self.uid)
            self.ctx.ips.release(self.ip)
            self.finished.set()

    def _run(self) -> None:
        self.ip = self.ctx.ips.allocate(self.pod.get("status", {}).get("podIP"))
        if self.ctx.network is not None:
            pod_dir = self.ctx.pod_dir(self.pod)
            pod_dir.mkdir(parents=True, exist_ok=True)
            # Recorded first, so that `down` can remove it even after a runner crash.
            (pod_dir / "netns").write_text(self.ctx.network.netns_name(self.uid))
            self.netns = self.ctx.network.attach(self.uid, self.ip)
        everyone = self.inits + self.containers
        bad = [c for c in everyone if not c.supported]
        for c in bad:
            c.set_waiting("UnsupportedImage", unsupported_image_message(c.image))
        while not (self._deleting or self._shutdown):
            try:
                if not bad:
                    self._step()
                in_sync = self._report()
            except Exception:  # API hiccups must not kill the pod's processes
                log.exception("pod %s/%s: step failed, retrying", self.ns, self.pod_name)
                in_sync = False
                time.sleep(1)
            if _terminal(self.phase) and in_sync:
                return
            self._wake.wait(TICK)
            self._wake.clear()
        self._stop_all()
        if self._deleting and not self._shutdown:
            # As the kubelet does since v1.27: a deleted pod reaches a terminal phase, with its containers'
            # exit codes, before it goes. The Job controller needs it for podFailurePolicy and for
            # podReplacementPolicy: Failed (the replacement starts only once this pod is terminal).
            self._report(final=True)
            self._delete_now()

    def _step(self) -> None:
        if self.volumes is None:
            if time.monotonic() < self._last_refresh + 1.0:
                return  # a referenced object was missing: retry once a second
            self._last_refresh = time.monotonic()
            volumes = PodVolumes(self.ctx, self.pod, self.ip)
            try:
                volumes.prepare()
            except ConfigError as e:
                for c in self.inits + self.containers:
                    c.set_waiting(e.reason, e.message)
                return
            self.volumes = volumes
        elif time.monotonic() - self._last_refresh > REFRESH_EVERY:
            self._last_refresh = time.monotonic()
            try:
                self.volumes.refresh()
            except (ConfigError, KubeError) as e:
                log.warning("pod %s/%s: volume refresh: %s", self.ns, self.pod_name, e)
        pending_init = next((c for c in self.inits if c.exit_code != 0), None)
        if pending_init is not None:
            for c in self.containers:
                c.set_waiting("PodInitializing")
            self._drive(pending_init, init=True)
            return
        for c in self.containers:
            self._drive(c, init=False)

    def _drive(self, c: Container, init: bool) -> None:
        """Advance one container: start, reap, probe, restart per restartPolicy."""
        t = time.monotonic()
        if c.running:
            if c.poll():
                self._after_exit(c, init)
            elif c.kill_deadline is None and not init and c.probe(self.ip) == "liveness":
                log.info("pod %s/%s: liveness failed for %s", self.ns, self.pod_name, c.name)
                c.terminate(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
            return
        if "terminated" in c.state or t < c.next_start:
            return
        self._start(c)
        if not c.running and "terminated" in c.state:  # noop image
            self._after_exit(c, init)

    def _after_exit(self, c: Container, init: bool) -> None:
        failed = c.exit_code != 0
        restart = (self.policy == "Always" and not init) or (self.policy != "Never" and failed)
        if restart:
            c.schedule_restart()

    def _service_env(self) -> dict[str, str]:
        port, host = str(self.ctx.api_port), self.ctx.api_host
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            "POD_IP": self.ip,
        }

    def _start(self, c: Container) -> None:
        assert self.volumes is not None
        try:
            env = container_env(
                self.ctx.kube,
                self.pod,
                c.spec,
                self.ctx.host_env(),
                self._service_env(),
                self.ip,
                HOST_CPUS,
                HOST_MEM,
            )
            env["HOSTNAME"] = dns.hostname(self.pod)
            argv = c.argv(env)
            mounts = self.volumes.mounts(c.spec)
        except ConfigError as e:
            c.set_waiting(e.reason, e.message)
            c.next_start = time.monotonic() + 1.0
            return
        term_path = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        file_mounts = [Mount(c.term_file, term_path), *self._dns_mounts()]
        c.start(wrap(argv, mounts, file_mounts, c.spec.get("workingDir"), dns.hostname(self.pod), self.netns), env)

    def _dns_mounts(self) -> list[Mount]:
        """/etc/hosts and /etc/resolv.conf of this pod, written once into its directory."""
        etc = self.ctx.pod_dir(self.pod) / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        files = {"hosts": dns.hosts_file(self.pod, self.ip), "resolv.conf": dns.resolv_conf(self.pod, self.ctx.dns_ip)}
        mounts = []
        for name, content in files.items():
            if content is not None:
                (etc / name).write_text(content)
                mounts.append(Mount(etc / name, f"/etc/{name}", read_only=True))
        return mounts

    def _stop_all(self) -> None:
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds", self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        grace = min(float(grace), 5.0) if self._shutdown else float(grace)
        everyone = self.inits + self.containers
        for c in everyone:
            c.terminate(grace)
        deadline = time.monotonic() + grace + 5
        while any(c.running for c in everyone) and time.monotonic() < deadline:
            for c in everyone:
                c.poll()
            time.sleep(0.05)
        for c in everyone:
            c.kill()

    def _delete_now(self) -> None:
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            self.ctx.kube.delete(self.path, body)
        except KubeError as e:
            if e.status not in (404, 409):
                raise

    # --- status --------------------------------------------------------------------------------
    def _compute_phase(self) -> str:
        if any(c.exit_code not in (0, None) and self.policy == "Never" and "terminated" in c.state for c in self.inits):
            return "Failed"
        if any(c.exit_code != 0 for c in self.inits):
            return "Pending"
        cs = self.containers
        if any(c.running for c in cs):
            return "Running"
        if all("terminated" in c.state for c in cs):
            return "Failed" if any(c.exit_code for c in cs) else "Succeeded"
        if any(c.runs for c in cs):
            return "Running"  # waiting to restart
        return "Pending"

    def _condition(self, kind: str, ok: bool, reason: str | None = None) -> Obj:
        status = "True" if ok else "False"
        old = self.conditions.get(kind)
        if old and old["status"] == status and old.get("reason") == reason:
            return old
        cond: Obj = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": now()}
        if reason:
            cond["reason"] = reason
        self.conditions[kind] = cond
        return cond

    def _report(self, final: bool = False) -> bool:
        """Patch the pod status if it changed; True when the server has the current status.

        ``final``: the pod was deleted and its processes stopped; it ends Failed unless all containers succeeded.
        """
        phase = self._compute_phase()
        if final and not _terminal(phase):
            phase = "Failed"
        if _terminal(phase):
            for c in self.containers:
                c.ready = False
        self.phase = phase
        initialized = all(c.exit_code == 0 for c in self.inits)
        ready = bool(self.containers) and all(c.ready and c.running for c in self.containers)
        not_ready = None if ready else ("PodCompleted" if _terminal(phase) else "ContainersNotReady")
        conditions = [
            self._condition("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
            self._condition("Ready", ready, not_ready),
            self._condition("ContainersReady", ready, not_ready),
            self._condition("PodScheduled", True),
        ]
        # Conditions others set (DisruptionTarget from the eviction API or the scheduler) are kept: a merge
        # patch replaces the whole list.
        ours = {c["type"] for c in conditions}
        conditions += [c for c in (self.pod.get("status") or {}).get("conditions") or [] if c.get("type") not in ours]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.ctx.api_host,
            "hostIPs": [{"ip": self.ctx.api_host}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        text = json.dumps(status, sort_keys=True)
        if text == self._last_status:
            return True
        try:
            self.ctx.kube.merge_patch(f"{self.path}/status", {"status": status})
            self._last_status = text
            return True
        except KubeError as e:
            if e.status == 404:
                self._shutdown = True  # the pod is gone
            else:
                log.warning("pod %s/%s: status patch failed: %s", self.ns, self.pod_name, e)
            return False
