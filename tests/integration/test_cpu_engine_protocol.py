"""Request parameters as vLLM's OpenAI server takes them: honoured (logprobs from the model itself, n,
min_tokens, continuous usage, the last chunk's text) or refused with vLLM's 400 and its words."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.integration import test_cpu_engine as shared
from tests.integration.test_cpu_engine import (
    PROMPT,
    InProcessEngine,
    chat,
    load,
    sse_events,
    text_of,
    tiny_assets,
)

pytestmark = pytest.mark.integration
engine = shared.engine  # the same module-scoped fixtures as test_cpu_engine (an engine of their own here)
client = shared.client


def reference_logprobs(ids: list[int], adapter: str | None = None) -> Any:
    """log_softmax of the model's logits at every position of ``ids``, straight from transformers/peft."""
    import torch
    from transformers import AutoModelForCausalLM

    assets = tiny_assets()
    model: Any = AutoModelForCausalLM.from_pretrained(assets.base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, getattr(assets, adapter))
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    return error


def test_chat_logprobs_are_the_models_own(client: httpx.Client, engine: InProcessEngine) -> None:
    load(client, "a1", tiny_assets().a1)
    body = chat(client, "a1", logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 8
    prompt = engine.host.chat_prompt(PROMPT)
    ref = reference_logprobs(prompt, "a1")
    first = content[0]
    assert math.isclose(first["logprob"], float(ref[len(prompt) - 1].max()), abs_tol=1e-4), "greedy: the top one"
    best = ref[len(prompt) - 1].topk(3)
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert first["top_logprobs"][0]["token"] == first["token"]
    assert first["bytes"] == list(first["token"].encode())
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]
    plain = chat(client, "a1", logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [c["top_logprobs"] for c in plain] == [[]] * 8
    assert chat(client, "a1").json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(("extra", "message", "param"), [
    ({"logprobs": True, "top_logprobs": 21},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
     "logprobs"),
    ({"top_logprobs": 2}, "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
     "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -2},
     "`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-2)", "top_logprobs"),
    ({"stream_options": {"include_usage": True}},
     "Stream options can only be defined when `stream=True`. (parameter=stream_options)", "stream_options"),
    ({"use_beam_search": True, "n": 2},
     "The CPU engine does not implement beam search; send `use_beam_search: false`. (parameter=use_beam_search)",
     "use_beam_search"),
    ({"min_tokens": 9}, "min_tokens must be less than or equal to max_tokens=8, got 9.", None),
    ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1.", None),
    ({"n": 0}, "n must be at least 1, got 0.", None),
    ({"prompt_logprobs": 1, "stream": True},
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)", "prompt_logprobs"),
], ids=["top-logprobs-over-max", "top-without-logprobs", "top-negative", "stream-options-without-stream",
        "beam-search", "min-over-max", "min-negative", "n-zero", "prompt-logprobs-streamed"])
def test_chat_parameters_vllm_refuses(client: httpx.Client, extra: dict[str, Any], message: str,
                                      param: str | None) -> None:
    error = error_of(chat(client, "tiny", **extra))
    assert (error["message"], error["param"]) == (message, param)


def completion(client: httpx.Client, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def test_completion_logprobs_and_prompt_logprobs(client: httpx.Client, engine: InProcessEngine) -> None:
    host = engine.host
    prompt = host.text_prompt("The sky is")
    choice = completion(client, logprobs=2, prompt_logprobs=1).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"]), "the chosen token plus the top 2"
    ref = reference_logprobs(prompt)
    assert math.isclose(lp["token_logprobs"][0], float(ref[-1].max()), abs_tol=1e-4)
    prompt_lp = choice["prompt_logprobs"]
    assert len(prompt_lp) == len(prompt) and prompt_lp[0] is None
    for j in range(1, len(prompt)):
        own = prompt_lp[j][str(prompt[j])]
        assert math.isclose(own["logprob"], float(ref[j - 1, prompt[j]]), abs_tol=1e-4)
        assert own["rank"] == int((ref[j - 1] > ref[j - 1, prompt[j]]).sum()) + 1
        assert own["decoded_token"] == host.token_text(prompt[j])
        assert 1 <= len(prompt_lp[j]) <= 2
    echoed = completion(client, logprobs=1, echo=True).json()["choices"][0]
    assert echoed["text"].startswith("The sky is")
    assert echoed["logprobs"]["token_logprobs"][0] is None
    assert len(echoed["logprobs"]["tokens"]) == len(prompt) + 6
    assert completion(client).json()["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize(("extra", "message"), [
    ({"logprobs": -1}, "`logprobs` must be a positive value. (parameter=logprobs, value=-1)"),
    ({"logprobs": 25}, "Requested sample logprobs of 25, which is greater than max allowed: 20 "
                       "(parameter=logprobs, value=25)"),
    ({"prompt_logprobs": 30}, "Requested prompt logprobs of 30, which is greater than max allowed: 20 "
                              "(parameter=prompt_logprobs, value=30)"),
    ({"prompt_logprobs": -3}, "`prompt_logprobs` must be a positive value or -1. "
                              "(parameter=prompt_logprobs, value=-3)"),
], ids=["negative", "over-max", "prompt-over-max", "prompt-negative"])
def test_completion_logprobs_out_of_range(client: httpx.Client, extra: dict[str, Any], message: str) -> None:
    assert error_of(completion(client, **extra))["message"] == message


def test_n_choices(client: httpx.Client) -> None:
    load(client, "a1", tiny_assets().a1)
    greedy = chat(client, "a1", n=2).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1]
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    assert greedy["usage"]["completion_tokens"] == 16
    sampled = completion(client, prompt=["The sky is", "Hi"], n=3, temperature=1.0, seed=7).json()
    assert [c["index"] for c in sampled["choices"]] == list(range(6))
    assert len({c["text"] for c in sampled["choices"][:3]}) > 1, "seed + i per choice, not three copies"
    again = completion(client, prompt=["The sky is", "Hi"], n=3, temperature=1.0, seed=7).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in sampled["choices"]]
    events = sse_events(client, "/v1/chat/completions",
                        {"model": "a1", "messages": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                         "n": 2, "stream": True})
    texts = ["", ""]
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts == [greedy["choices"][0]["message"]["content"]] * 2


def test_streams_end_with_text_and_count_usage_continuously(client: httpx.Client) -> None:
    whole = text_of(chat(client, "tiny", max_tokens=8))
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "logprobs": True}
    chunks = sse_events(client, "/v1/chat/completions", body)[:-1]
    last_choice = [c for c in chunks if c["choices"]][-1]
    assert last_choice["choices"][0]["finish_reason"] == "length"
    last_token = last_choice["choices"][0]["logprobs"]["content"][-1]["token"]
    assert last_choice["choices"][0]["delta"]["content"].endswith(last_token) and last_token
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 8
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    plain = [c for c in sse_events(client, "/v1/completions", {"model": "tiny", "prompt": "The sky is",
                                                                 "max_tokens": 5, "temperature": 0,
                                                                 "ignore_eos": True, "stream": True})[:-1]]
    assert plain[-1]["choices"][0]["finish_reason"] == "length" and plain[-1]["choices"][0]["text"]
    assert all("usage" not in c or c["usage"] is None for c in plain)


def test_min_tokens_holds_off_stop_strings(client: httpx.Client) -> None:
    text = completion(client, max_tokens=8).json()["choices"][0]["text"]
    stop = text[0]
    stopped = completion(client, max_tokens=8, stop=[stop]).json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"], stopped["stop_reason"]) == ("", "stop", stop)
    held = completion(client, max_tokens=8, stop=[stop], min_tokens=4).json()
    assert held["usage"]["completion_tokens"] >= 4
    assert held["choices"][0]["text"].startswith(text[:1])
