"""schemathesis against the real CPU engine and the real agent, as processes, from their OpenAPI (issue 14).

Every operation gets generated requests, valid and invalid (wrong types, missing fields, huge numbers,
odd strings), each with a deadline: none may crash the server (a 5xx it did not mean to send) or hang it.
The one 5xx that is part of the contract is vLLM's own: a runtime LoRA load that fails is 500
InternalServerError in the OpenAI error envelope (v0.34), so that answer is checked for its shape instead.
The agent serves its OpenAPI nowhere (its endpoints are probes and read-only reports), so its schema is taken
from the FastAPI app the process runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from kubelora.api.runtime import DesiredAdapter, DesiredAdapters
from kubelora_server.testing import Process, free_port
from tests.integration.test_cpu_engine import tiny_assets

pytestmark = pytest.mark.integration
REQUEST_TIMEOUT = 60.0
"""Seconds one request may take: the tiny model answers in well under a second (at most 64 tokens), so a
request past this on a busy 2-core box is one the server will never answer."""
LOAD_LORA_PATH = "/v1/load_lora_adapter"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    assets = tiny_assets()
    engine_port, agent_port = free_port(), free_port()
    engine_url, agent_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{agent_port}"
    desired = root / "adapters.json"
    desired.write_text(json.dumps(DesiredAdapters(
        base_model=f"file://{assets.base}", served_name="tiny", max_lora_rank=16, max_loras=2, max_cpu_loras=4,
        adapters=[DesiredAdapter(name="a1", uri=f"file://{assets.a1}")]).wire()))
    engine = Process.module("kubelora_server.engine", [
        "--model", f"file://{assets.base}", "--served-model-name", "tiny", "--host", "127.0.0.1",
        "--port", str(engine_port), "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4",
        "--max-lora-rank", "16", "--max-model-len", "64", "--lora-modules", f"a2={assets.a2}",
        "--middleware", "kubelora_server.lora_guard.PodLocalLoRAUpdates",
    ], root / "engine.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).start()
    agent = Process.module("kubelora_server.agent", [
        "--desired-file", str(desired), "--engine-url", engine_url, "--cache-dir", str(root / "cache"),
        "--host", "127.0.0.1", "--port", str(agent_port), "--resync-interval", "0.5", "--pod-name", "pod-0",
    ], root / "agent.log").start()
    try:
        engine.wait_healthy(engine_url + "/health")
        agent.wait_healthy(agent_url + "/healthz", timeout=60)
        yield {"engine": engine_url, "agent": agent_url, "engine_log": str(engine.log_path),
               "agent_log": str(agent.log_path)}
    finally:
        agent.stop()
        engine.stop()


@pytest.fixture(scope="module")
def engine_schema(servers: dict[str, str]) -> Any:
    return schemathesis.openapi.from_url(servers["engine"] + "/openapi.json")


@pytest.fixture(scope="module")
def agent_schema(servers: dict[str, str]) -> Any:
    from kubelora_server.agent.runner import Agent
    from kubelora_server.agent.server import create_app

    return schemathesis.openapi.from_dict(create_app(cast(Agent, None)).openapi())


def _intended_5xx(path: str, response: Any) -> bool:
    """vLLM answers a failed runtime load with 500 InternalServerError in its error envelope."""
    if path != LOAD_LORA_PATH or response.status_code != 500:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(error.get("type") == "InternalServerError" and error.get("message"))


def check(case: Any, base_url: str, health: str, log: str) -> None:
    try:
        response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # a timeout or a dropped connection: the server hung or died on this input
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-20:])
        raise AssertionError(f"{case.method} {case.formatted_path} got no answer: {exc!r}\n{tail}") from None
    if response.status_code >= 500 and not _intended_5xx(case.path, response):
        raise AssertionError(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                             f"{response.text[:500]}\nbody: {case.body!r}")
    # Still serving after this input (an answer was not the last thing it managed).
    assert httpx.get(base_url + health, timeout=5).status_code in (200, 503)


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def fuzz(schema: Any, base_url: str, health: str, log: str) -> list[str]:
    """Every operation, with valid and with invalid requests; returns the labels it exercised."""
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                check(case, base_url, health, log)

            try:
                run()
            except Unsatisfiable:
                # No input to get wrong (GET /health): only the negative mode can run out of cases.
                assert mode is GenerationMode.NEGATIVE, operation.label
                continue
            seen.append(f"{operation.label} {mode.value}")
    return seen


def test_cpu_engine_survives_generated_requests(servers: dict[str, str], engine_schema: Any) -> None:
    seen = fuzz(engine_schema, servers["engine"], "/health", servers["engine_log"])
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/load_lora_adapter",
                  "POST /v1/unload_lora_adapter"):
        assert f"{label} positive" in seen and f"{label} negative" in seen, seen
    assert "GET /v1/models/{model_id} positive" in seen  # any string is a valid id: no negative case exists


def test_agent_survives_generated_requests(servers: dict[str, str], agent_schema: Any) -> None:
    seen = fuzz(agent_schema, servers["agent"], "/healthz", servers["agent_log"])
    assert {label.rsplit(" ", 1)[0] for label in seen} == {"GET /healthz", "GET /readyz", "GET /adapters",
                                                            "GET /metrics"}


@pytest.mark.parametrize(("prompt", "message"), [
    pytest.param("", "The decoder prompt cannot be empty", id="empty-text"),
    pytest.param([-7, 3], "Token id -7 is out of vocabulary", id="negative-id"),
    pytest.param([3, 10**12], f"Token id {10**12} is out of vocabulary", id="id-past-the-vocabulary"),
])
def test_prompts_the_fuzz_found_are_refused_as_vllm_does(servers: dict[str, str], prompt: Any, message: str) -> None:
    """Each crashed the engine's forward pass with a 500 before (found by the schemathesis run above)."""
    resp = httpx.post(servers["engine"] + "/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                                 "max_tokens": 2}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == {"message": message, "type": "BadRequestError", "param": None, "code": 400}
