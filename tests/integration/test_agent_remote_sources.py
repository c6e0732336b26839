"""Manifest-less adapters from the Hub and from an OCI registry, through the real agent and the real CPU engine.

A LoRA adapter saved by peft (untouched) is pushed to a local Hub (``kubelora_server.testing_hub``, reached by
huggingface_hub through ``HF_ENDPOINT``) and to a local OCI registry (``kubelora_server.testing_oci``, with the
token handshake); the agent process serves both by URI, reports the digest of the files, and each answers
exactly as the same folder served from disk. A pinned digest that the files do not have fails only that adapter.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubelora.api.digest import digest_of, file_sha256
from kubelora.api.runtime import DesiredAdapter, DesiredAdapters
from kubelora_server.testing import Process, free_port
from kubelora_server.testing_hub import FakeHub, serve_hub
from kubelora_server.testing_oci import FakeRegistry, serve_registry
from tests.integration.test_agent_e2e import peft_save_pretrained, wait_for
from tests.integration.test_cpu_engine import PROMPT, tiny_assets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FakeHub, str, FakeRegistry, str]]:
    hub, registry = FakeHub(), FakeRegistry(token="t0k", user="robot", password="s3cret")
    with serve_hub(hub) as hub_url, serve_registry(registry) as registry_host:
        yield hub, hub_url, registry, registry_host


def test_hub_and_oci_adapters_serve_through_the_real_agent(
        tmp_path: Path, servers: tuple[FakeHub, str, FakeRegistry, str]) -> None:
    hub, hub_url, registry, registry_host = servers
    base = tiny_assets().base
    src = tmp_path / "handmade"
    peft_save_pretrained(base, src, seed=7)
    files = sorted(p.name for p in src.iterdir())
    digest = digest_of({f: file_sha256(src / f) for f in files})
    commit = hub.push("org/tiny-lora", src)
    registry.push("org/tiny-lora", "v1", src)
    adapters = {
        "disk": f"file://{src}",
        "hub": f"hf://org/tiny-lora@{commit}",
        "oci": f"oci://{registry_host}/org/tiny-lora:v1",
    }
    desired = DesiredAdapters(
        base_model=f"file://{base}", served_name="tiny", max_lora_rank=16, max_loras=2, max_cpu_loras=8,
        adapters=[*(DesiredAdapter(name=n, uri=u) for n, u in adapters.items()),
                  DesiredAdapter(name="pinned", uri=adapters["hub"], digest="sha256:" + "0" * 64)])
    (tmp_path / "adapters.json").write_text(json.dumps(desired.wire()))
    engine_port, agent_port = free_port(), free_port()
    engine_url, agent_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{agent_port}"
    engine = Process.module("kubelora_server.engine", [
        "--model", f"file://{base}", "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(engine_port),
        "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "8", "--max-lora-rank", "16", "--max-model-len", "128",
    ], tmp_path / "engine.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    agent = Process.module("kubelora_server.agent", [
        "--desired-file", str(tmp_path / "adapters.json"), "--engine-url", engine_url,
        "--cache-dir", str(tmp_path / "cache"), "--host", "127.0.0.1", "--port", str(agent_port),
        "--resync-interval", "0.5", "--file-poll-interval", "0.2", "--pod-name", "pod-0",
    ], tmp_path / "agent.log", env={"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
                                    "OCI_USERNAME": "robot", "OCI_PASSWORD": "s3cret"})
    engine.start()
    agent.start()
    try:
        engine.wait_healthy(engine_url + "/health")
        agent.wait_healthy(agent_url + "/healthz", timeout=60)

        def report() -> dict[str, dict[str, str]]:
            return {a["name"]: a for a in httpx.get(agent_url + "/adapters", timeout=5).json()["adapters"]}

        def settled() -> bool:
            states = {n: a["state"] for n, a in report().items()}
            return states == {"disk": "Loaded", "hub": "Loaded", "oci": "Loaded", "pinned": "Failed"}

        try:
            wait_for("hub and oci adapters loaded", settled, timeout=120)
        except AssertionError:
            raise AssertionError(agent.log_tail(60)) from None
        got = report()
        assert {got[n]["digest"] for n in adapters} == {digest}, "one digest: the files', wherever they came from"
        assert got["pinned"]["reason"] == "DigestMismatch" and digest in got["pinned"]["message"]

        def chat(model: str) -> str:
            resp = httpx.post(engine_url + "/v1/chat/completions", timeout=30, json={
                "model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert resp.status_code == 200, resp.text
            return str(resp.json()["choices"][0]["message"]["content"])

        answers = {n: chat(n) for n in (*adapters, "tiny")}
        assert answers["hub"] == answers["oci"] == answers["disk"] != answers["tiny"]
        assert any(r.startswith("GET /org/tiny-lora/resolve/") for r in hub.requests)
        assert "/token" in registry.requests
    finally:
        agent.stop()
        engine.stop()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
