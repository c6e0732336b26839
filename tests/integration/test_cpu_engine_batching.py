"""The CPU engine's scheduler: requests for different adapters share one batch and answer as if alone, the
batch holds at most --max-loras adapters, and loads and unloads go in between two decode steps instead of
waiting for generations to end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import test_cpu_engine as shared
from tests.integration.test_cpu_engine import (
    InProcessEngine,
    chat,
    load,
    text_of,
    tiny_assets,
)

pytestmark = pytest.mark.integration
engine = shared.engine  # the same module-scoped fixtures as test_cpu_engine (an engine of their own here)
client = shared.client


def spy_batches(monkeypatch: pytest.MonkeyPatch, engine: InProcessEngine,
                delay: float = 0.0) -> list[list[str | None]]:
    """Record the adapters of every forward pass's rows; ``delay`` makes each step slower (a long run)."""
    scheduler = engine.host.scheduler
    real: Callable[..., Any] = scheduler._forward
    seen: list[list[str | None]] = []

    def forward(batch: list[Any], **kwargs: Any) -> Any:
        seen.append([s.adapter for s in batch])
        if delay:
            time.sleep(delay)
        return real(batch, **kwargs)

    monkeypatch.setattr(scheduler, "_forward", forward)
    return seen


def run_together(engine: InProcessEngine, jobs: list[tuple[str | None, list[int], int]]) -> list[list[int]]:
    """Submit every job between the same two steps (from the scheduler thread itself) and return each one's
    greedy token ids, read back from its logprobs."""
    from kubelora_server.engine.sampling import SamplingParams

    host = engine.host
    outputs: list[list[int]] = [[] for _ in jobs]
    finished = [threading.Event() for _ in jobs]
    errors: list[BaseException] = []

    def emitter(i: int) -> Callable[[Any], None]:
        def emit(item: Any) -> None:
            if item is None:
                finished[i].set()
            elif isinstance(item, BaseException):
                errors.append(item)
            else:
                outputs[i].extend(e.token_id for e in item.logprobs)
        return emit

    def submit_all() -> None:
        for i, (model, prompt, max_tokens) in enumerate(jobs):
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
            host.submit(model, prompt, params, emitter(i), threading.Event())

    host.scheduler.call(submit_all)
    for event in finished:
        assert event.wait(60)
    assert not errors
    return outputs


def test_a_mixed_adapter_batch_answers_as_each_request_alone(engine: InProcessEngine, client: httpx.Client,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    load(client, "a2", assets.a2)
    host = engine.host
    prompts = [host.text_prompt(p) for p in ("The sky is", "Once upon a time in a land far away", "Hi")]
    jobs = [(model, prompt, 12) for prompt in prompts for model in ("a1", "a2", None)]
    alone = [run_together(engine, [job])[0] for job in jobs]
    seen = spy_batches(monkeypatch, engine)
    together = run_together(engine, jobs)
    assert together == alone
    assert len(set(map(tuple, alone))) > 3, "the adapters and prompts really change the output"
    assert max(len(b) for b in seen) == len(jobs), "all nine rode in one batch"
    assert {"a1", "a2", None} <= set(max(seen, key=len)), "base and both adapters in the same forward pass"


def test_a_batch_holds_at_most_max_loras_adapters(engine: InProcessEngine, client: httpx.Client,
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kubelora_server.testing import make_adapter

    assets = tiny_assets()
    load(client, "a1", assets.a1)
    load(client, "a2", assets.a2)
    load(client, "a3", make_adapter(assets.base, tmp_path / "a3", rank=8, seed=5, scale=3.0))
    prompt = engine.host.text_prompt("The sky is")
    jobs = [(m, prompt, 6) for m in ("a1", "a2", "a3", None)]
    alone = [run_together(engine, [job])[0] for job in jobs]
    seen = spy_batches(monkeypatch, engine)
    assert run_together(engine, jobs) == alone
    assert max(len({a for a in b if a}) for b in seen) == 2, "--max-loras 2: a3 waits for a free slot"
    assert any(None in b and len(b) == 3 for b in seen), "base requests do not take an adapter slot"


def test_a_load_and_an_unload_finish_while_a_long_generation_runs(engine: InProcessEngine, client: httpx.Client,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream must still be producing tokens after the load and the unload have answered; behind a lock
    around generation both would wait for its end."""
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    want = text_of(chat(client, "a1", max_tokens=60))
    spy_batches(monkeypatch, engine, delay=0.03)  # 60 steps: ~2 s of generation
    events: list[str] = []
    streamed: list[str] = []
    started = threading.Event()

    def generate() -> None:
        body = {"model": "a1", "messages": [{"role": "user", "content": "What colour is the sky?"}],
                "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=client.base_url, timeout=60) as other, \
                other.stream("POST", "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    chunk = httpx.Response(200, content=line[6:]).json()
                    if chunk["choices"]:
                        streamed.append(chunk["choices"][0]["delta"].get("content", ""))
                        if chunk["choices"][0]["finish_reason"]:
                            events.append("generation finished")

    with ThreadPoolExecutor(1) as pool:
        generation = pool.submit(generate)
        assert started.wait(30)
        assert load(client, "a2", assets.a2).status_code == 200
        events.append("loaded")
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
        events.append("unloaded")
        generation.result()
    assert events == ["loaded", "unloaded", "generation finished"]
    assert "".join(streamed) == want, "the running generation is undisturbed by the load"


def test_unloading_an_adapter_in_use_lets_its_running_request_finish(engine: InProcessEngine,
                                                                     client: httpx.Client,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tiny_assets()
    load(client, "a1", assets.a1)
    want = text_of(chat(client, "a1", max_tokens=40))
    seen = spy_batches(monkeypatch, engine, delay=0.02)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: chat(client, "a1", max_tokens=40))
        while not seen:
            time.sleep(0.01)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
        assert chat(client, "a1").status_code == 404, "new requests no longer find it"
        assert text_of(running.result()) == want, "the running one finished on the weights it started with"
    assert engine.host.resident() == []


def test_metrics_name_waiting_adapters_beyond_max_loras(engine: InProcessEngine, client: httpx.Client,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kubelora_server.testing import make_adapter

    assets = tiny_assets()
    load(client, "a1", assets.a1)
    load(client, "a2", assets.a2)
    load(client, "a3", make_adapter(assets.base, tmp_path / "a3", rank=8, seed=5, scale=3.0))
    seen = spy_batches(monkeypatch, engine, delay=0.02)
    lines: list[str] = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda m=m: chat(client, m, max_tokens=30)) for m in ("a1", "a2")]
        while not any(len(b) == 2 for b in seen):
            time.sleep(0.01)
        futures.append(pool.submit(lambda: chat(client, "a3", max_tokens=5)))
        for _ in range(200):
            line = next(x for x in client.get("/metrics").text.splitlines()
                        if x.startswith("vllm:lora_requests_info{"))
            if 'waiting_lora_adapters="a3"' in line:
                lines.append(line)
                break
            time.sleep(0.01)
        for f in futures:
            text_of(f.result())
    assert lines and 'running_lora_adapters="a1,a2"' in lines[0]
