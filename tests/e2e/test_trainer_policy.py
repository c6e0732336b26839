"""The trainer's identity, on the real API server: with the chart's ValidatingAdmissionPolicy installed, a
training pod's ServiceAccount token (the Role the operator gives it, pinned to its own LoRAJob) may patch
``status.progress`` and nothing else in the status; the operator's identity (here: the admin) may."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubelora.api.meta import ObjectRef
from kubelora.api.trainer_policy import MESSAGE
from kubelora.resources.lorajob_config import trainer_identity
from kubelora_local.kube import Credentials, Kube, KubeError

from .conftest import LocalCluster
from .test_lorajob import GROUP_PATH, spec

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
PLURALS = {"ValidatingAdmissionPolicy": "validatingadmissionpolicies",
           "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings"}
ADAPTER = {"uri": "s3://elsewhere/forged", "digest": "sha256:" + "0" * 64, "sizeBytes": 1, "rank": 8,
           "baseModel": "pvc://models/tiny", "peftType": "LORA"}


@pytest.fixture
def policy(cluster: LocalCluster, namespace: str) -> Iterator[list[dict]]:
    env = {**os.environ, "HELM_CACHE_HOME": str(cluster.state_dir / "helm")}
    rendered = subprocess.run(
        [str(REPO / ".venv" / "bin" / "helm"), "template", namespace, str(REPO / "charts" / "kubelora"),
         "--show-only", "templates/trainer-status-policy.yaml"],
        capture_output=True, text=True, check=True, env=env).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    paths = []
    for doc in docs:
        plural = PLURALS[doc["kind"]]
        path = f"/apis/admissionregistration.k8s.io/v1/{plural}"
        cluster.kube.create(path, doc)
        paths.append(f"{path}/{doc['metadata']['name']}")
    yield docs
    for path in paths:
        cluster.kube.delete(path)


def create_or_keep(cluster: LocalCluster, path: str, body: dict) -> None:
    try:
        cluster.kube.create(path, body)
    except KubeError as e:
        if e.status != 409:  # the session's operator may have made it first
            raise


def trainer_client(cluster: LocalCluster, namespace: str, job: dict) -> Kube:
    """A client holding a token of the trainer's ServiceAccount, with the RBAC the operator gives it."""
    paths = {"ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
             "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
             "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"}
    identity = trainer_identity(ObjectRef.of(job))
    for manifest in identity:
        create_or_keep(cluster, paths[manifest["kind"]], manifest)
    sa = identity[0]["metadata"]["name"]
    token = cluster.kube.create(f"{paths['ServiceAccount']}/{sa}/token",
                                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                 "spec": {"expirationSeconds": 600}})["status"]["token"]
    admin = cluster.info.credentials
    return Kube(Credentials(admin.server, token, admin.ca_file))


def test_trainer_may_patch_only_progress(cluster: LocalCluster, namespace: str, policy: list[dict]) -> None:
    job = cluster.kube.create(f"{GROUP_PATH}/{namespace}/lorajobs", {
        "apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob", "metadata": {"name": "guarded"},
        "spec": spec("guarded", suspend=True)})
    status_path = f"{GROUP_PATH}/{namespace}/lorajobs/guarded/status"
    trainer = trainer_client(cluster, namespace, job)

    def forged_adapter_refused() -> str:
        try:
            trainer.merge_patch(status_path, {"status": {"adapter": ADAPTER}})
        except KubeError as e:
            return e.body if e.status in (403, 422) and MESSAGE in e.body else ""
        trainer.merge_patch(status_path, {"status": {"adapter": None}})  # policy not active yet: undo, retry
        return ""

    cluster.wait_for(forged_adapter_refused, 30, "the policy to refuse the trainer's status.adapter")
    for forged in ({"phase": "Succeeded"}, {"lastSucceededAdapter": ADAPTER},
                   {"conditions": [{"type": "Ready", "status": "True", "reason": "Forged", "message": "",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}):
        with pytest.raises(KubeError) as refused:
            trainer.merge_patch(status_path, {"status": forged})
        assert MESSAGE in refused.value.body, forged

    progress = {"step": 3, "totalSteps": 10, "adapter": ADAPTER}  # a claim the operator checks before using it
    patched = trainer.merge_patch(status_path, {"status": {"progress": progress}})
    assert patched["status"]["progress"]["step"] == 3

    with pytest.raises(KubeError) as other:  # resourceNames: its own LoRAJob only
        trainer.merge_patch(f"{GROUP_PATH}/{namespace}/lorajobs/someone-else/status", {"status": {"progress": {}}})
    assert other.value.status == 403

    admin = cluster.kube.merge_patch(status_path, {"status": {"message": "the operator may"}})
    assert admin["status"]["message"] == "the operator may"
