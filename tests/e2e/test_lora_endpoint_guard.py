"""Only the agent changes what a serving pod serves (issue 14), on the local cluster with the CPU engine.

The agent, inside the pod, loads adapters through the engine's runtime LoRA API; the test host, outside the pod
(it connects from the node's address, as any other pod or a gateway would from theirs), gets 403 from the same
routes on the same port, while inference there keeps answering and the adapter set does not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelora_local.tinymodel import build_tiny_model

from .conftest import LocalCluster
from .test_adapterdeployment import GROUP_PATH, SERVED, Env, adapter_deployment, chat, make_uri_adapter, served_models

pytestmark = pytest.mark.e2e


@pytest.fixture
def serving(cluster: LocalCluster, namespace: str, operator: Any) -> Iterator[Env]:
    base_dir = build_tiny_model(cluster.pvc_dir(namespace, "models") / "tiny")
    cluster.pvc_dir(namespace, "adapters")
    yield Env(cluster, namespace, base_dir)


def test_runtime_lora_api_answers_the_agent_but_not_the_network(serving: Env, tmp_path: Path) -> None:
    support = make_uri_adapter(serving, "support", seed=5)
    other = make_uri_adapter(serving, "other", seed=6)
    serving.cluster.kube.create(f"{GROUP_PATH}/{serving.ns}/adapterdeployments",
                                adapter_deployment("chat", [{"name": "support", "uri": support}]))
    serving.wait_adapters("chat", {"support": "Loaded"})  # the agent's load went through the guard
    pod = serving.ready_pod("chat")
    engine = f"http://{pod['status']['podIP']}:8000"
    other_dir = other.replace("pvc://adapters", "/mnt/pvc/adapters")

    load = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": "intruder", "lora_path": other_dir},
                      timeout=30)
    unload = httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "support"}, timeout=30)
    spoofed = httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "support"},
                         headers={"X-Forwarded-For": "127.0.0.1"}, timeout=30)
    for resp in (load, unload, spoofed):
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["type"] == "PermissionDenied"

    assert served_models(pod) == {SERVED, "support"}
    assert chat(pod, "support").status_code == 200
    assert serving.adapters("chat")["support"]["state"] == "Loaded"
