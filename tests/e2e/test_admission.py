"""The opt-in admission webhook on the real API server: a second operator with ``--webhook self-signed``
watching only the test's namespace, and its own ValidatingWebhookConfiguration (deleted afterwards, so
the rest of the session runs without a webhook)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora_local.kube import KubeError
from tests.e2e.operator_fixture import OperatorProcess

pytestmark = pytest.mark.e2e

VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
# OperatorProcess always passes -A; this operator must watch only its namespace, so drop it.
ONE_NAMESPACE = "import sys; from kubelora.__main__ import main; main([a for a in sys.argv[1:] if a != '-A'])"


def lorajob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubelora.io/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"uri": "pvc://data/a.jsonl"},
            "output": {"uri": "pvc://adapters/a"},
            **spec,
        },
    }


@pytest.fixture
def webhook(cluster: Any, namespace: str, tmp_path: Path) -> Iterator[str]:
    managed = f"{namespace}.e2e.kubelora.io"
    proc = OperatorProcess(
        kubeconfig=Path(cluster.kubeconfig),
        log_path=tmp_path / "operator.log",
        launcher=[sys.executable, "-c", ONE_NAMESPACE, "-n", namespace],
        extra_args=["--webhook", "self-signed"],
        env={"KUBELORA_WEBHOOK_PORT": "0", "KUBELORA_WEBHOOK_MANAGED": managed},
    )
    try:
        proc.start()
        cluster.wait_for(
            lambda: len(cluster.kube.get(f"{VWC}/{managed}").get("webhooks") or []) == 3,
            timeout=60,
            what=f"ValidatingWebhookConfiguration {managed}",
        )
        yield managed
    finally:
        proc.stop()
        try:
            cluster.kube.delete(f"{VWC}/{managed}")
        except KubeError as e:
            if e.status != 404:
                raise


def test_bad_spec_is_rejected_at_create(cluster: Any, namespace: str, webhook: str) -> None:
    path = f"/apis/kubelora.io/v1alpha1/namespaces/{namespace}/lorajobs"
    with pytest.raises(KubeError) as rejected:
        cluster.kube.create(path, lorajob("bad", method="lora", quantization={"quantType": "nf4"}))
    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    assert message.startswith(
        f'admission webhook "lorajob-spec.{webhook}" denied the request: invalid spec: '
        "spec: quantization is only used with method: qlora"
    ), message
    created = cluster.kube.create(path, lorajob("good", method="lora"))
    assert created["metadata"]["name"] == "good"
