"""spec.output.merged end to end: a LoRAJob publishes a merged model (status.merged), an AdapterDeployment serves
that folder as its base, and it answers exactly what the base with the adapter attached answers (greedy)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from kubelora.api.digest import adapter_files, digest_of, file_sha256

from .test_adapterdeployment import GROUP_PATH, Env, adapter_deployment, env  # noqa: F401 - env is a fixture
from .test_lorajob import spec

pytestmark = pytest.mark.e2e


def greedy(pod: dict[str, Any], model: str, prompt: str) -> str:
    resp = httpx.post(f"http://{pod['status']['podIP']}:8000/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": prompt}]})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


def test_merged_model_published_and_served_as_a_base(env: Env) -> None:  # noqa: F811
    from kubelora_local.tinymodel import write_chat_dataset

    kube = env.cluster.kube
    write_chat_dataset(env.cluster.pvc_dir(env.ns, "data") / "chat.jsonl", n=32)
    body = spec("bot", max_steps=8, output={"uri": "pvc://adapters/bot", "merged": {"dtype": "float32"}})
    kube.create(f"{GROUP_PATH}/{env.ns}/lorajobs", {"apiVersion": "kubelora.io/v1alpha1", "kind": "LoRAJob",
                                                    "metadata": {"name": "bot"}, "spec": body})
    job = env.cluster.wait_for(
        lambda: s if (s := kube.get(f"{GROUP_PATH}/{env.ns}/lorajobs/bot").get("status") or {}).get("phase")
        in ("Succeeded", "Failed") else None, timeout=300, what="LoRAJob bot to finish")
    assert job["phase"] == "Succeeded", json.dumps(job, indent=1)
    merged = job["merged"]
    assert merged["uri"] == "pvc://adapters/bot/rev-1/merged" and merged["adapterDigest"] == job["adapter"]["digest"]
    folder = env.cluster.pvc_dir(env.ns, "adapters") / "bot" / "rev-1" / "merged"
    assert digest_of({rel: file_sha256(folder / rel) for rel in adapter_files(folder, ())}) == merged["digest"]

    attached = adapter_deployment("attached", [{"name": "bot", "loraJobRef": {"name": "bot"}}])
    served = adapter_deployment("merged", [])
    served["spec"]["baseModel"] = {"uri": merged["uri"], "servedName": "bot-merged"}
    for ad in (attached, served):
        kube.create(f"{GROUP_PATH}/{env.ns}/adapterdeployments", ad)
    env.wait_adapters("attached", {"bot": "Loaded"})
    env.wait_phase("merged", "Ready")
    a_pod, m_pod = env.ready_pod("attached"), env.ready_pod("merged")
    for prompt in ("What colour is the sky?", "Say hello."):
        assert greedy(m_pod, "bot-merged", prompt) == greedy(a_pod, "bot", prompt)
