"""The local StorageClass's provisioner: every claim of that class gets a hostPath volume.

Like a real dynamic provisioner it creates a PersistentVolume pre-bound to the claim (claimRef)
and lets the controller-manager's binder finish the binding, so the scheduler sees Bound claims;
when a claim goes away, its Released volume and directory go too (reclaim policy Delete). The
directory is `<state>/pvcs/<ns>/<claim>`, which is also where pods mount the claim from.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from ..kube import JSON, Kube, KubeError, list_watch

log = logging.getLogger("kubelora.runner")
STORAGE_CLASS = "standard"
PROVISIONER = "kubelora.dev/local-path"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


def storage_class() -> JSON:
    """The cluster's default StorageClass (claims without a class get it at admission)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def volume_for(claim: JSON, directory: Path) -> JSON:
    """The PersistentVolume that satisfies `claim`, pre-bound to it."""
    meta, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
        },
    }


class Provisioner:
    """Watches claims and volumes; see the module docstring."""

    def __init__(self, kube: Kube, pvc_root: Path) -> None:
        self.kube = kube
        self.pvc_root = pvc_root

    def on_claim(self, kind: str, claim: JSON) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        if kind == "DELETED" or spec.get("volumeName") or meta.get("deletionTimestamp"):
            return
        if spec.get("storageClassName") != STORAGE_CLASS:
            return
        directory = self.pvc_root / meta["namespace"] / meta["name"]
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.kube.create("/api/v1/persistentvolumes", volume_for(claim, directory))
        except KubeError as e:
            if e.status != 409:
                log.warning("provisioning %s/%s failed: %s", meta["namespace"], meta["name"], e)

    def on_volume(self, kind: str, volume: JSON) -> None:
        meta = volume["metadata"]
        mine = (meta.get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        if kind == "DELETED" or not mine or volume.get("status", {}).get("phase") != "Released":
            return
        path = Path(volume["spec"]["hostPath"]["path"])
        if self.pvc_root in path.parents:
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.kube.delete(f"/api/v1/persistentvolumes/{meta['name']}")
        except KubeError as e:
            if e.status != 404:
                log.warning("deleting released volume %s failed: %s", meta["name"], e)

    def start(self, stop: threading.Event) -> None:
        for path, handler in (
            ("/api/v1/persistentvolumeclaims", self.on_claim),
            ("/api/v1/persistentvolumes", self.on_volume),
        ):
            threading.Thread(target=list_watch, args=(self.kube, path, handler, stop), daemon=True).start()
