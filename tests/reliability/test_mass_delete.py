"""LoRAJobs created and deleted at once leave no orphans: a batch is created and the whole collection deleted
while the operator is still creating their pre-flight and training children. Every child the operator made,
before or after the delete, is gone once the garbage collector and the operator are done (owner references
by UID: a child created for an object that was already deleted has an absent owner and is collected too).
bench/operator_scale.py --delete-at-once does the same with 1,000."""

from __future__ import annotations

import time

import pytest

from tests.e2e.cluster_fixture import LocalCluster
from tests.e2e.operator_fixture import OperatorProcess

from .orphans import create_lorajobs, delete_all_lorajobs, left

pytestmark = pytest.mark.e2e
COUNT = 100


def noop_lorajob(name: str) -> dict[str, object]:
    """The local runner's noop image exits 0 at once: pre-flight passes, the run ends without an adapter."""
    return {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "metadata": {"name": name}, "spec": {
        "image": "ghcr.io/kubelora/noop", "method": "lora", "resources": {"gpus": 0},
        "baseModel": {"uri": "pvc://models/tiny"}, "dataset": {"uri": "pvc://data/chat.jsonl"},
        "output": {"uri": f"pvc://adapters/{name}"}}}


def test_lorajobs_created_and_deleted_at_once_leave_no_orphans(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess
) -> None:
    for claim in ("models", "data", "adapters"):
        cluster.pvc_dir(namespace, claim)
    create_lorajobs(cluster.kube, namespace, [noop_lorajob(f"lj-{i:03d}") for i in range(COUNT)])
    cluster.wait_for(lambda: left(cluster.kube, namespace).get("Job", 0) >= 10, 120, "the first pre-flight Jobs")
    at_delete = left(cluster.kube, namespace)
    delete_all_lorajobs(cluster.kube, namespace)

    deadline = time.monotonic() + 300
    while (remaining := left(cluster.kube, namespace)) and time.monotonic() < deadline:
        time.sleep(1)
    assert remaining == {}, f"left behind after deleting {COUNT} LoRAJobs (at the delete: {at_delete})"
    assert at_delete.get("LoRAJob") == COUNT and at_delete.get("Job", 0) < 2 * COUNT, (
        f"the delete must race the operator's creates: {at_delete}")
    time.sleep(5)  # nothing comes back: no reconcile recreates a child for a deleted object
    assert left(cluster.kube, namespace) == {}
    assert operator.running
