"""The real CPU engine on a tiny random model: vLLM's API shapes, per-request adapters, limits, streaming.

The engine runs in-process (uvicorn in a thread) so the model is built and imported once; adapters are real
peft adapters with random, non-zero B matrices, so each one visibly changes the output.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "What colour is the sky?"}]


@dataclass(frozen=True)
class Assets:
    root: Path
    base: Path
    a1: Path
    a2: Path
    big: Path


@functools.cache
def tiny_assets() -> Assets:
    """One tiny model and a few adapters per test process (shared with the agent's integration tests)."""
    import atexit

    from kubelora_local.tinymodel import build_tiny_model
    from kubelora_server.testing import make_adapter

    root = Path(tempfile.mkdtemp(prefix="kubelora-serving-"))
    atexit.register(shutil.rmtree, root, True)
    base = build_tiny_model(root / "base")
    return Assets(
        root,
        base,
        make_adapter(base, root / "a1", rank=8, seed=1, scale=3.0),
        make_adapter(base, root / "a2", rank=16, seed=2, scale=3.0),
        make_adapter(base, root / "big", rank=32, seed=3),
    )


class InProcessEngine:
    """uvicorn in a thread around a ModelHost."""

    def __init__(self, argv: list[str], allow_runtime_lora: bool = True) -> None:
        import uvicorn

        from kubelora_server.engine.app import create_app
        from kubelora_server.engine.config import parse_args
        from kubelora_server.engine.host import ModelHost
        from kubelora_server.testing import free_port

        self.port = free_port()
        self.args = parse_args([*argv, "--host", "127.0.0.1", "--port", str(self.port)])
        self.host = ModelHost(self.args)
        config = uvicorn.Config(
            create_app(self.host, allow_runtime_lora=allow_runtime_lora),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessEngine:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine() -> Iterator[InProcessEngine]:
    assets = tiny_assets()
    with InProcessEngine(
        [
            "--model",
            f"file://{assets.base}",
            "--served-model-name",
            "tiny",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "2",
            "--max-lora-rank",
            "16",
            "--max-model-len",
            "128",
        ]
    ) as eng:
        yield eng


@pytest.fixture()
def client(engine: InProcessEngine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=60) as c:
        for card in c.get("/v1/models").json()["data"]:
            if card["parent"]:
                c.post("/v1/unload_lora_adapter", json={"lora_name": card["id"]})
        yield c


def load(client: httpx.Client, name: str, path: Path, **extra: Any) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def chat(client: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/chat/completions", json=body)


def text_of(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


def reference(base: Path, adapter: Path | None) -> str:
    """What transformers' own generate() says, without the engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def test_health_and_models_list_the_base(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    (card,) = data["data"]
    assert (card["id"], card["parent"], card["max_model_len"], card["owned_by"]) == ("tiny", None, 128, "vllm")


def test_each_name_uses_its_own_adapter(client: httpx.Client) -> None:
    assets = tiny_assets()
    ok = load(client, "a1", assets.a1)
    assert ok.status_code == 200 and ok.text == "Success: LoRA adapter 'a1' added successfully."
    assert load(client, "a2", assets.a2).status_code == 200
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert (cards["a1"]["parent"], cards["a1"]["root"]) == ("tiny", str(assets.a1))
    outs = {name: text_of(chat(client, name)) for name in ("tiny", "a1", "a2")}
    assert len(set(outs.values())) == 3, outs
    assert outs["tiny"] == reference(assets.base, None)
    assert outs["a1"] == reference(assets.base, assets.a1)
    assert outs["a2"] == reference(assets.base, assets.a2)
    assert text_of(chat(client, "a1")) == outs["a1"], "greedy decoding is deterministic"
    body = chat(client, "a1").json()
    assert body["object"] == "chat.completion" and body["model"] == "a1"
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_for_different_adapters_do_not_mix(client: httpx.Client) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    load(client, "a2", assets.a2)
    expected = {name: text_of(chat(client, name)) for name in ("tiny", "a1", "a2")}
    names = ["tiny", "a1", "a2"] * 4
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda n: (n, text_of(chat(client, n))), names))
    assert all(text == expected[name] for name, text in got)


def sse_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line:
                assert line.startswith("data: ")
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_chat_matches_the_plain_answer(client: httpx.Client) -> None:
    load(client, "a1", tiny_assets().a1)
    whole = text_of(chat(client, "a1"))
    body = {
        "model": "a1",
        "messages": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(client, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "a1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_completions_plain_and_streaming(client: httpx.Client) -> None:
    load(client, "a2", tiny_assets().a2)
    body = {"model": "a2", "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "text_completion" and data["usage"]["completion_tokens"] == 6
    events = sse_events(client, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == data["choices"][0]["text"]
    sampled = {**body, "temperature": 1.0, "seed": 11}
    first = client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=sampled).json()["choices"][0]["text"] == first


def test_unload_then_requests_for_the_name_are_404(client: httpx.Client) -> None:
    load(client, "a1", tiny_assets().a1)
    resp = client.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'a1' removed successfully."
    missing = chat(client, "a1")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "The model `a1` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    again = client.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert again.status_code == 404 and again.json()["error"]["type"] == "NotFoundError"
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert text_of(chat(client, "tiny")) == reference(tiny_assets().base, None), "base is intact after unload"


def test_limits_and_errors_are_vllm_like(client: httpx.Client) -> None:
    assets = tiny_assets()
    assert load(client, "a1", assets.a1).status_code == 200
    dup = load(client, "a1", assets.a2)
    assert dup.status_code == 400 and "has already been loaded" in dup.json()["error"]["message"]
    rank = load(client, "big", assets.big)
    assert rank.status_code == 500  # vLLM v0.34: any failure in add_lora but "No adapter found"
    assert rank.json()["error"] == {"message": "LoRA rank 32 is greater than max_lora_rank 16.",
                                    "type": "InternalServerError", "param": None, "code": 500}
    nowhere = load(client, "x", assets.root / "nowhere")
    assert nowhere.status_code == 404 and "No adapter found" in nowhere.json()["error"]["message"]
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
    long = chat(client, "tiny", max_tokens=1000)
    assert long.status_code == 400 and "maximum context length is 128" in long.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"model": "tiny"}).status_code == 400


def test_more_adapters_than_max_cpu_loras_register_and_evicted_ones_are_read_back(
        client: httpx.Client, engine: InProcessEngine) -> None:
    """--max-cpu-loras 2 is an LRU of weights, as in vLLM: a third name registers, the least recently used
    weights leave memory, and a request for an evicted adapter reads it back and answers as before."""
    assets = tiny_assets()
    assert load(client, "a1", assets.a1).status_code == 200
    first = text_of(chat(client, "a1"))
    assert load(client, "a2", assets.a2).status_code == 200
    assert load(client, "a3", assets.a2).status_code == 200
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["tiny", "a1", "a2", "a3"]
    assert engine.host.resident() == ["a2", "a3"]
    assert text_of(chat(client, "a1")) == first == reference(assets.base, assets.a1)
    assert engine.host.resident() == ["a3", "a1"]


# vLLM's own BADREQUEST_CASES (tests/entrypoints/openai/test_lora_adapters.py) in v0.34's words: config change ->
# message. v0.34 answers them 500 InternalServerError (releases before v0.12: 400 BadRequestError).
VLLM_REFUSED_CASES = [
    ({"r": 1024}, "is greater than max_lora_rank"),
    ({"bias": "all"}, "Adapter bias is not supported."),
    ({"use_dora": True}, "does not yet support DoRA"),
    ({"modules_to_save": ["lm_head"]}, "Unsupported modules_to_save: ['lm_head']"),
    ({"init_lora_weights": "pissa"}, "does not support init_lora_weights='pissa'"),
    ({"layer_replication": [[0, 1]]}, "does not support layer_replication"),
]


@pytest.mark.parametrize(("change", "expected"), VLLM_REFUSED_CASES)
def test_adapters_vllm_refuses_are_refused_in_its_words(client: httpx.Client, tmp_path: Path,
                                                        change: dict[str, Any], expected: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_assets().a1, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    resp = load(client, "bad", bad)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "InternalServerError" and error["code"] == 500 and expected in error["message"]
    assert "bad" not in [c["id"] for c in client.get("/v1/models").json()["data"]]


def test_a_broken_adapter_folder_is_refused_and_only_a_missing_one_is_a_404(client: httpx.Client,
                                                                             tmp_path: Path) -> None:
    notjson = tmp_path / "notjson"
    notjson.mkdir()
    (notjson / "adapter_config.json").write_text("this is not json")
    resp = load(client, "invalid-json", notjson)
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "InternalServerError"
    assert resp.json()["error"]["message"].startswith("Expecting value")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny_assets().a1 / "adapter_config.json", noweights / "adapter_config.json")
    resp = load(client, "noweights", noweights)
    assert resp.status_code == 500 and resp.json()["error"]["message"] == f"{noweights} doesn't contain tensors"
    resp = load(client, "notfound", Path("/not/an/adapter"))
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "NotFoundError"
    assert resp.json()["error"]["message"] == "Loading lora notfound failed: No adapter found for /not/an/adapter"


def test_one_model_card_by_id(client: httpx.Client) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    card = client.get("/v1/models/a1").json()
    assert (card["id"], card["root"], card["parent"]) == ("a1", str(assets.a1), "tiny")
    assert client.get("/v1/models/tiny").json()["parent"] is None
    missing = client.get("/v1/models/ghost")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


def test_vllm_metrics_name_the_adapters_in_flight(client: httpx.Client) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    text_of(chat(client, "a1"))
    metrics = client.get("/metrics").text
    assert 'vllm:request_success_total{finished_reason="length",model_name="a1"}' in metrics
    assert 'vllm:e2e_request_latency_seconds_count{model_name="a1"}' in metrics
    assert 'vllm:generation_tokens_total{model_name="a1"}' in metrics
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    seen: list[str] = []

    def scrape_while_generating() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as other:
            for _ in range(200):
                line = next((x for x in other.get("/metrics").text.splitlines()
                             if x.startswith("vllm:lora_requests_info{")), "")
                if 'running_lora_adapters="a1"' in line:
                    seen.append(line)
                    return
                time.sleep(0.005)

    with ThreadPoolExecutor(2) as pool:
        scraper = pool.submit(scrape_while_generating)
        pool.submit(lambda: chat(client, "a1", max_tokens=64)).result()
        scraper.result()
    assert seen, "a scrape during generation names the running adapter"


def test_load_inplace_swaps_the_weights_under_the_same_name(client: httpx.Client) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    load(client, "a2", assets.a2)
    want = text_of(chat(client, "a2"))
    swapped = load(client, "a1", assets.a2, load_inplace=True)
    assert swapped.status_code == 200
    assert text_of(chat(client, "a1")) == want
    cards = {c["id"]: c["root"] for c in client.get("/v1/models").json()["data"]}
    assert cards["a1"] == str(assets.a2)


def test_runtime_lora_routes_need_the_env_switch(engine: InProcessEngine) -> None:
    from fastapi.testclient import TestClient

    from kubelora_server.engine.app import create_app

    closed = TestClient(create_app(engine.host, allow_runtime_lora=False))
    resp = closed.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert resp.status_code == 404
