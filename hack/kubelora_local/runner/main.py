"""The runner process: the local node's kubelet. Watch the Pods bound to it, hand them to workers.

kube-scheduler binds pods to the Node this process registers (with real capacity, GPUs
included), so a pod that does not fit stays Pending with the scheduler's reason. One watch over
the node's pods; each gets a PodWorker thread; SIGTERM stops every container and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from ..cluster import NODE_NAME, load
from ..kube import KubeError
from ..network import PodNetwork
from . import node
from .context import Obj, RunnerContext
from .ips import IpPool
from .pod import PodWorker
from .provisioner import Provisioner

log = logging.getLogger("kubelora.runner")
PODS = "/api/v1/pods"


class Runner:
    """Dispatches pod events to workers."""

    def __init__(self, ctx: RunnerContext) -> None:
        self.ctx = ctx
        self.workers: dict[str, PodWorker] = {}
        self.stop = threading.Event()
        # The kubelet's own filter: only pods bound to this node.
        self._selector = {"fieldSelector": f"spec.nodeName={ctx.node_name}"}

    def _force_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.ctx.kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except KubeError as e:
            if e.status not in (404, 409):
                log.warning("deleting %s/%s failed: %s", meta["namespace"], meta["name"], e)

    def handle(self, kind: str, pod: Obj) -> None:
        """React to one watch event (or one listed pod, kind 'SYNC')."""
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if kind == "DELETED":
            worker = self.workers.pop(uid, None)
            if worker is not None:
                worker.shutdown()
                threading.Thread(target=self._cleanup, args=(worker, pod), daemon=True).start()
            return
        if spec.get("nodeName") != self.ctx.node_name:
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            if meta.get("deletionTimestamp") and worker.finished.is_set():
                self._force_delete(pod)
            return
        if meta.get("deletionTimestamp"):
            self._force_delete(pod)
            return
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        worker = PodWorker(self.ctx, pod)
        self.workers[uid] = worker
        worker.start()

    def _cleanup(self, worker: PodWorker, pod: Obj) -> None:
        worker.finished.wait(60)
        shutil.rmtree(self.ctx.pod_dir(pod), ignore_errors=True)

    def watch_forever(self) -> None:
        """List + watch all pods; relist when the watch expires (410) or breaks."""
        while not self.stop.is_set():
            try:
                listing = self.ctx.kube.get(PODS, **self._selector)
                seen = set()
                for pod in listing.get("items") or []:
                    seen.add(pod["metadata"]["uid"])
                    self.handle("SYNC", pod)
                for uid, worker in list(self.workers.items()):  # pods deleted while we were not watching
                    if uid not in seen:
                        self.handle("DELETED", worker.pod)
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for event in self.ctx.kube.watch(PODS, rv, params=self._selector):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise KubeError(int(obj.get("code", 500)), str(obj), "watch pods")
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], obj)
            except Exception as e:
                if self.stop.is_set():
                    return
                if not (isinstance(e, KubeError) and e.status == 410):
                    log.warning("pod watch broke (%s); relisting", e)
                    time.sleep(0.5)

    def shutdown(self) -> None:
        self.stop.set()
        for worker in self.workers.values():
            worker.shutdown()
        for worker in self.workers.values():
            worker.finished.wait(15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kubelora-local-runner", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    info = load(args.state_dir)
    ctx = RunnerContext(
        kube=info.client(),
        state_dir=Path(info.state_dir),
        api_port=info.apiserver_port,
        api_host=info.node_ip,
        node_name=NODE_NAME,
        ips=IpPool(info.pod_subnet),
        dns_ip=info.dns_ip,
        network=PodNetwork(info.pod_subnet) if os.geteuid() == 0 else None,
    )
    runner = Runner(ctx)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop.set())
    signal.signal(signal.SIGINT, lambda *_: runner.stop.set())
    node.register(ctx.kube, ctx.node_name, info.node_ip, info.gpus)
    threading.Thread(
        target=node.heartbeat, args=(ctx.kube, ctx.node_name, info.node_ip, info.gpus, runner.stop), daemon=True
    ).start()
    Provisioner(ctx.kube, ctx.state_dir / "pvcs").start(runner.stop)
    threading.Thread(target=runner.watch_forever, name="watch", daemon=True).start()
    log.info("runner ready: node %s, state %s", ctx.node_name, ctx.state_dir)
    runner.stop.wait()
    log.info("stopping: terminating %d pod workers", len(runner.workers))
    runner.shutdown()
