"""The agent's engine client against httpx.MockTransport answering as vLLM documents it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from tenacity import wait_none

from kubelora_server.agent.engine_client import (
    AdapterAlreadyLoaded,
    AdapterNotLoaded,
    EngineClient,
    EngineRejected,
    EngineUnavailable,
    RuntimeLoRADisabled,
    is_permanent,
)
from kubelora_server.openai_api import ApiError, parse_error

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# What vLLM says when a POST /v1/load_lora_adapter fails, by cause: path suffix -> (message, permanent). The
# status is one for every cause but "No adapter found" (404 NotFoundError): v0.34 (vllm/entrypoints/openai/
# models/serving.py, the pinned release) answers 500 InternalServerError, releases before v0.12 400
# BadRequestError. Messages are those of vLLM v0.34's PEFTHelper, worker manager and LoRAModel.
VLLM_LOAD_ERRORS: dict[str, tuple[str, bool]] = {
    "missing": ("Loading lora a failed: No adapter found for /cache/missing", False),
    "rank64": ("LoRA rank 64 is greater than max_lora_rank 16.", True),
    "bias": ("Adapter bias is not supported.", True),
    "dora": ("vLLM does not yet support DoRA.", True),
    "mts": ('vLLM only supports modules_to_save being either None or ["classifier", "score"] for classification '
            "models. Unsupported modules_to_save: ['lm_head']", True),
    "pissa": ("vLLM does not support init_lora_weights='pissa'. Inits such as PiSSA, OLoRA, CorDA and LoftQ modify "
              "the base model weights when PEFT loads the adapter.", True),
    "targets": ("While loading /cache/targets, expected target modules in ['q_proj', 'v_proj'] but received "
                "['qkv_proj']. Please verify that the loaded LoRA module is correct", True),
    "notjson": ("Expecting value: line 1 column 1 (char 0)", True),
    "noweights": ("/cache/noweights doesn't contain tensors", True),
    "oom": ("CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity of 79.15 GiB of which "
            "12.00 MiB is free.", False),
    "eio": ("[Errno 5] Input/output error: '/cache/eio/adapter_model.safetensors'", False),
    "timeout": ("Call to add_lora method failed: Timed out waiting for the engine core", False),
    "corrupt": ("Error while reading safetensors", False),
}
RELEASES = {"v0.34": (500, "InternalServerError"), "v0.11": (400, "BadRequestError")}


class FakeVllm:
    """vLLM's runtime LoRA routes: plain-text success, ``{"error": {...}}`` failures (``old_envelope``: the
    top-level ``{"object": "error", ...}`` of older releases), failures chosen by the path's last part."""

    def __init__(self, *, old_envelope: bool = False, runtime_lora: bool = True, ignore_inplace: bool = False,
                 release: str = "v0.34") -> None:
        self.loras: dict[str, str] = {}
        self.release = release
        self.old_envelope = old_envelope
        self.runtime_lora = runtime_lora
        self.ignore_inplace = ignore_inplace
        """vLLM before load_inplace existed: the field is ignored, a registered name is "already loaded"."""
        self.requests: list[tuple[str, str, Any]] = []
        self.refuse: dict[str, str] = {}
        """lora_path -> VLLM_LOAD_ERRORS key, for paths whose name does not say it."""
        self.fail_times: dict[str, int] = {}
        """lora_path -> how many more loads of it are refused (then it loads)."""
        self.hidden: set[str] = set()
        """names /v1/models leaves out (registered in another API-server process, or a stale listing)."""

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
            data += [{"id": n, "object": "model", "root": p, "parent": "base"} for n, p in self.loras.items()
                     if n not in self.hidden]
            return httpx.Response(200, json={"object": "list", "data": data})
        if not self.runtime_lora:
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/v1/load_lora_adapter":
            name, lora_path = body["lora_name"], body["lora_path"]
            if name in self.loras and (self.ignore_inplace or not body.get("load_inplace")):
                return self.error(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                    400,
                )
            kind = self.refuse.get(lora_path) or lora_path.rstrip("/").rsplit("/", 1)[-1].rsplit("-", 1)[-1]
            if self.fail_times.get(lora_path, 0) > 0:
                self.fail_times[lora_path] -= 1
                kind = "oom"
            if kind in VLLM_LOAD_ERRORS:
                message = VLLM_LOAD_ERRORS[kind][0]
                if "No adapter found" in message:
                    return self.error(message, "NotFoundError", 404)
                status, err_type = RELEASES[self.release]
                return self.error(message, err_type, status)
            self.loras[name] = lora_path
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            if name not in self.loras:
                return self.error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del self.loras[name]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed successfully.")
        return httpx.Response(404, json={"detail": "Not Found"})


def client_for(handler: Callable[[httpx.Request], httpx.Response], attempts: int = 3) -> EngineClient:
    return EngineClient("http://engine:8000", transport=httpx.MockTransport(handler), load_attempts=attempts,
                        retry_wait=wait_none())


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


@pytest.mark.parametrize(("release", "old_envelope"), [("v0.34", False), ("v0.11", False), ("v0.11", True)])
@pytest.mark.parametrize("kind", sorted(VLLM_LOAD_ERRORS))
def test_each_vllm_refusal_is_classified_by_its_message(kind: str, release: str, old_envelope: bool) -> None:
    message, permanent = VLLM_LOAD_ERRORS[kind]
    status, err_type = (404, "NotFoundError") if kind == "missing" else RELEASES[release]
    fake = FakeVllm(old_envelope=old_envelope, release=release)
    with pytest.raises(EngineRejected) as err:
        run(client_for(fake).load("a", f"/cache/a-{kind}"))
    assert (err.value.error.status, err.value.error.type, err.value.error.message) == (status, err_type, message)
    assert err.value.permanent is permanent
    assert str(err.value).startswith(f"HTTP {status}")
    loads = [r for r in fake.requests if r[1] == "/v1/load_lora_adapter"]
    assert len(loads) == (1 if permanent else 3), "transient refusals are retried, permanent ones are not"


def test_vllm_034_answers_a_refused_load_like_this() -> None:
    fake = FakeVllm()
    resp = fake(httpx.Request("POST", "http://e/v1/load_lora_adapter",
                              json={"lora_name": "a", "lora_path": "/cache/a-dora"}))
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "vLLM does not yet support DoRA.", "type": "InternalServerError",
                                     "param": None, "code": 500}}


def test_a_transient_refusal_that_clears_loads_within_one_call() -> None:
    fake = FakeVllm()
    fake.fail_times["/cache/a-1"] = 2  # CUDA OOM twice, then the LRU has made room
    run(client_for(fake, attempts=3).load("a", "/cache/a-1"))
    assert fake.loras == {"a": "/cache/a-1"}
    assert len([r for r in fake.requests if r[1] == "/v1/load_lora_adapter"]) == 3


def test_retries_back_off_exponentially_between_attempts() -> None:
    from tenacity import wait_exponential

    fake = FakeVllm()
    slept: list[float] = []
    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    engine = EngineClient("http://engine:8000", transport=httpx.MockTransport(fake), load_attempts=4,
                          retry_wait=wait_exponential(multiplier=0.5, max=8), retry_sleep=fake_sleep)

    async def scenario() -> None:
        with pytest.raises(EngineRejected):
            await engine.load("a", "/cache/a-oom")

    run(scenario())
    assert slept == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(("status", "message", "permanent"), [
    (500, "LoRA rank 64 is greater than max_lora_rank 16.", True),  # vLLM v0.34's status for every refusal
    (500, "EngineCore encountered an issue. See stack trace (above) for the root cause.", False),
    (429, "Too many requests", False),
    (400, "something nobody wrote down yet", False),  # unknown: bounded retries, not 300 s of Failed
    (400, "Loading lora x failed: CUDA out of memory while reading /cache/x (is greater than max_lora_rank?)", False),
    (400, "LoRA added vocab size 10 is greater than lora_extra_vocab_size 0.", True),
])
def test_classification_edges(status: int, message: str, permanent: bool) -> None:
    assert is_permanent(ApiError(status, message, "BadRequestError")) is permanent


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
