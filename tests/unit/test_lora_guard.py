"""The engines' runtime LoRA routes answer only the pod itself (issue 14).

They share the inference port, so the NetworkPolicy (ports, not paths) lets the gateway reach them too: the
chart test below pins that, and is why both engines install :class:`PodLocalLoRAUpdates` with
``--middleware``. The middleware is checked on raw ASGI scopes (the peer and local addresses a server sees)
and on the CPU engine's real app; the built manifests are checked to install it and to point the agent at the
address the engine listens on, which is what makes the agent's own requests pass.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from kubelora.api.adapterdeployment import AdapterDeployment
from kubelora.resources.serving_common import ENGINE_PORT
from kubelora.resources.serving_deployment import agent_container, engine_container
from kubelora.resources.serving_engine import LORA_GUARD
from kubelora_server.lora_guard import PodLocalLoRAUpdates, install

POD = "10.244.3.7"
REPO = Path(__file__).resolve().parents[2]
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"


def call(path: str, client: tuple[str, int] | None, server: tuple[str, int] | None = (POD, 8000),
         headers: list[tuple[bytes, bytes]] | None = None) -> int:
    """Status the guarded app answers; the inner app answers 200 for everything it is handed."""
    statuses: list[int] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "client": client,
             "server": server}
    asyncio.run(PodLocalLoRAUpdates(inner)(scope, receive, send))
    return statuses[0]


@pytest.mark.parametrize("path", [LOAD, UNLOAD, LOAD + "/", "/api" + LOAD, "/v1/LOAD_LORA_ADAPTER"])
@pytest.mark.parametrize(("client", "server"), [
    pytest.param(("10.244.3.9", 5000), (POD, 8000), id="another-pod"),
    pytest.param(("10.244.3.1", 5000), (POD, 8000), id="the-node"),
    pytest.param(("fd00::9", 5000), ("fd00::7", 8000), id="another-pod-v6"),
    pytest.param(("testclient", 5000), (POD, 8000), id="not-an-address"),
    pytest.param(None, (POD, 8000), id="no-peer"),
    pytest.param(("10.244.3.9", 5000), None, id="no-local-address"),
])
def test_lora_updates_from_outside_the_pod_are_refused(path: str, client: tuple[str, int] | None,
                                                       server: tuple[str, int] | None) -> None:
    assert call(path, client, server) == 403


@pytest.mark.parametrize(("client", "server"), [
    pytest.param((POD, 41000), (POD, 8000), id="agent-via-pod-ip"),
    pytest.param(("127.0.0.1", 41000), ("127.0.0.1", 8000), id="loopback"),
    pytest.param(("127.0.0.1", 41000), (POD, 8000), id="loopback-to-wildcard-bind"),
    pytest.param(("::1", 41000), ("::1", 8000), id="loopback-v6"),
    pytest.param(("::ffff:127.0.0.1", 41000), (POD, 8000), id="v4-mapped-loopback"),
    pytest.param(("fd00::7", 41000), ("fd00::7", 8000), id="agent-via-pod-ip-v6"),
])
@pytest.mark.parametrize("path", [LOAD, UNLOAD])
def test_lora_updates_from_the_pod_pass(path: str, client: tuple[str, int], server: tuple[str, int]) -> None:
    assert call(path, client, server) == 200


@pytest.mark.parametrize("header", [b"x-forwarded-for", b"Forwarded", b"x-real-ip"])
def test_a_proxy_cannot_speak_for_a_remote_client(header: bytes) -> None:
    assert call(LOAD, (POD, 41000), headers=[(header, b"127.0.0.1")]) == 403


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                                  "/v1/models/load_lora_adapter-ish"])
def test_inference_and_everything_else_stays_open(path: str) -> None:
    assert call(path, ("10.244.3.9", 5000)) == 200


def test_the_operator_installs_the_real_guard_in_both_engines() -> None:
    module, _, name = LORA_GUARD.rpartition(".")
    assert getattr(importlib.import_module(module), name) is PodLocalLoRAUpdates
    for engine in ("vllm", "cpu"):
        spec = AdapterDeployment.model_validate({
            "apiVersion": "kubelora.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": "chat"},
            "spec": {"baseModel": {"uri": "pvc://models/tiny", "servedName": "tiny"}, "engine": engine,
                     "resources": {"gpus": 1 if engine == "vllm" else 0}}}).spec
        engine_cmd = engine_container(spec, "img", "IfNotPresent", [])["command"]
        agent_cmd = agent_container("chat", spec, "img", "IfNotPresent", [])["command"]
        assert engine_cmd[engine_cmd.index("--middleware") + 1] == LORA_GUARD, engine
        # The agent calls the address the engine listens on, from inside the pod: its peer address is the
        # engine's local address, the case the guard lets through.
        host = engine_cmd[engine_cmd.index("--host") + 1]
        assert agent_cmd[agent_cmd.index("--engine-url") + 1] in (f"http://{host}:{ENGINE_PORT}",
                                                                  f"http://127.0.0.1:{ENGINE_PORT}")


def test_network_policy_cannot_tell_inference_from_lora_updates() -> None:
    """Why the guard exists: the gateway may reach the engine port, and the LoRA routes live on it."""
    from tests.unit.test_chart import VALUE_SETS, render

    docs = render(*VALUE_SETS["networkpolicy"])
    [serving] = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith(
        "-serving") and d["metadata"]["namespace"] == "a"]
    ports = {p["port"] for rule in serving["ingress"] for p in rule["ports"]}
    assert ENGINE_PORT in ports


def test_install_adds_the_guard_to_a_fastapi_app_as_vllm_does() -> None:
    app = FastAPI()

    @app.post(LOAD)
    async def load() -> dict[str, str]:
        return {"ok": "loaded"}

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, str]:
        return {"ok": "chat"}

    install(app, LORA_GUARD)

    async def post(client: tuple[str, int], path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{POD}:8000") as http:
            return await http.post(path, json={})

    refused = asyncio.run(post(("10.244.3.9", 5000), LOAD))
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "PermissionDenied" and LOAD in refused.json()["error"]["message"]
    assert asyncio.run(post(("10.244.3.9", 5000), "/v1/chat/completions")).status_code == 200
    assert asyncio.run(post((POD, 41000), LOAD)).json() == {"ok": "loaded"}
    with pytest.raises(ValueError, match="class or a coroutine function"):
        install(app, "kubelora_server.lora_guard.LORA_UPDATE_ROUTES")


def test_vllms_python_can_import_the_guard_from_the_files_the_image_copies(tmp_path: Path) -> None:
    """vLLM runs on its own python, outside KubeLoRA's venv: the image copies a few stdlib-only files next to
    vLLM, and ``--middleware`` must import from those alone (no pydantic, no site-packages)."""
    dockerfile = (REPO / "server_image" / "Dockerfile").read_text()
    copy = re.search(r"cp ((?:server_image/kubelora_server/\S+\.py\s+(?:\\\s+)?)+)\"\$\{site\}/kubelora_server/\"",
                     dockerfile)
    assert copy is not None, "the server Dockerfile no longer copies the guard next to vLLM"
    files = re.findall(r"server_image/kubelora_server/(\S+\.py)", copy.group(1))
    (tmp_path / "kubelora_server").mkdir()
    for name in files:
        shutil.copy(REPO / "server_image" / "kubelora_server" / name, tmp_path / "kubelora_server" / name)
    module = LORA_GUARD.rpartition(".")[0]
    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                           f"import {module}; print({LORA_GUARD})"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "PodLocalLoRAUpdates" in done.stdout
    assert "import kubelora_server.lora_guard" in dockerfile, "the image build checks the import"
