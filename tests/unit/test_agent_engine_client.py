"""The agent's engine client against httpx.MockTransport answering as vLLM documents it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from kubelora_server.agent.engine_client import (
    AdapterAlreadyLoaded,
    AdapterNotLoaded,
    EngineClient,
    EngineRejected,
    EngineUnavailable,
    RuntimeLoRADisabled,
)
from kubelora_server.openai_api import parse_error

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeVllm:
    """vLLM v0.11's runtime LoRA routes: plain-text success, ``{"error": {...}}`` failures."""

    def __init__(self, *, old_envelope: bool = False, runtime_lora: bool = True) -> None:
        self.loras: dict[str, str] = {}
        self.old_envelope = old_envelope
        self.runtime_lora = runtime_lora
        self.requests: list[tuple[str, str, Any]] = []

    def error(self, message: str, err_type: str, code: int) -> httpx.Response:
        if self.old_envelope:
            body = {"object": "error", "message": message, "type": err_type, "param": None, "code": code}
        else:
            body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
        return httpx.Response(code, json=body)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            data = [{"id": "base", "object": "model", "root": "/models/base", "parent": None}]
            data += [{"id": n, "object": "model", "root": p, "parent": "base"} for n, p in self.loras.items()]
            return httpx.Response(200, json={"object": "list", "data": data})
        if not self.runtime_lora:
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/v1/load_lora_adapter":
            name, lora_path = body["lora_name"], body["lora_path"]
            if name in self.loras and not body.get("load_inplace"):
                return self.error(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                    400,
                )
            if lora_path.endswith("missing"):
                return self.error(f"Loading lora {name} failed: No adapter found for {lora_path}", "NotFoundError", 404)
            if lora_path.endswith("rank64"):
                return self.error("LoRA rank 64 is greater than max_lora_rank 16.", "BadRequestError", 400)
            if lora_path.endswith("corrupt"):
                return self.error("Error while reading safetensors", "InternalServerError", 500)
            self.loras[name] = lora_path
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            if name not in self.loras:
                return self.error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del self.loras[name]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed successfully.")
        return httpx.Response(404, json={"detail": "Not Found"})


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> EngineClient:
    return EngineClient("http://engine:8000", transport=httpx.MockTransport(handler))


def test_load_list_unload_round_trip() -> None:
    fake = FakeVllm()
    engine = client_for(fake)

    async def scenario() -> None:
        assert await engine.health()
        await engine.load("a", "/cache/a-1")
        view = await engine.models()
        assert view.base == ["base"] and view.adapters == {"a": "/cache/a-1"}
        await engine.unload("a")
        assert (await engine.models()).adapters == {}
        await engine.aclose()

    run(scenario())
    assert fake.requests[1] == ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/cache/a-1"})


@pytest.mark.parametrize("old_envelope", [False, True])
def test_loading_a_name_already_loaded_is_recognised(old_envelope: bool) -> None:
    fake = FakeVllm(old_envelope=old_envelope)
    fake.loras["a"] = "/cache/a-1"
    with pytest.raises(AdapterAlreadyLoaded) as err:
        run(client_for(fake).load("a", "/cache/a-2"))
    assert err.value.error.status == 400 and err.value.error.type == "InvalidUserInput"


def test_load_inplace_sends_the_flag() -> None:
    fake = FakeVllm()
    fake.loras["a"] = "/cache/a-1"
    run(client_for(fake).load("a", "/cache/a-2", inplace=True))
    assert fake.loras["a"] == "/cache/a-2"
    assert fake.requests[-1][2]["load_inplace"] is True


@pytest.mark.parametrize("old_envelope", [False, True])
def test_unloading_an_unknown_name_is_not_loaded(old_envelope: bool) -> None:
    with pytest.raises(AdapterNotLoaded) as err:
        run(client_for(FakeVllm(old_envelope=old_envelope)).unload("ghost"))
    assert err.value.error.status == 404 and "cannot be found" in err.value.error.message


def test_unload_unknown_as_400_from_older_engines_is_also_not_loaded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400,
            json={
                "object": "error",
                "message": "The lora adapter 'x' cannot be found.",
                "type": "InvalidUserInput",
                "code": 400,
            },
        )

    with pytest.raises(AdapterNotLoaded):
        run(client_for(handler).unload("x"))


@pytest.mark.parametrize(("path", "status"), [("/x/missing", 404), ("/x/rank64", 400), ("/x/corrupt", 500)])
def test_refusals_carry_status_and_message(path: str, status: int) -> None:
    with pytest.raises(EngineRejected) as err:
        run(client_for(FakeVllm()).load("a", path))
    assert err.value.error.status == status
    assert str(err.value).startswith(f"HTTP {status}")


def test_runtime_lora_disabled_is_explained() -> None:
    with pytest.raises(RuntimeLoRADisabled) as err:
        run(client_for(FakeVllm(runtime_lora=False)).load("a", "/cache/a"))
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in str(err.value)


def test_engine_down_is_unavailable_not_a_rejection() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    engine = client_for(refuse)
    assert run(engine.health()) is False
    with pytest.raises(EngineUnavailable):
        run(engine.models())
    with pytest.raises(EngineUnavailable):
        run(engine.load("a", "/cache/a"))
    with pytest.raises(EngineUnavailable):
        run(engine.unload("a"))


def test_overloaded_engine_is_unavailable() -> None:
    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="Service Unavailable")

    engine = client_for(busy)
    assert run(engine.health()) is False
    with pytest.raises(EngineUnavailable):
        run(engine.load("a", "/cache/a"))


def test_garbled_models_answer_is_unavailable() -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"unexpected": True})

    with pytest.raises(EngineUnavailable):
        run(client_for(garbled).models())


@pytest.mark.parametrize(
    ("body", "message", "err_type"),
    [
        (b'{"error": {"message": "m1", "type": "T1", "param": null, "code": 400}}', "m1", "T1"),
        (b'{"object": "error", "message": "m2", "type": "T2", "code": 404}', "m2", "T2"),
        (b'{"detail": "Not Found"}', "Not Found", ""),
        (b"plain failure", "plain failure", ""),
    ],
)
def test_parse_error_reads_every_envelope(body: bytes, message: str, err_type: str) -> None:
    err = parse_error(418, body)
    assert (err.status, err.message, err.type) == (418, message, err_type)
