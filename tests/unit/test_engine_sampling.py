"""CPU engine pieces that need no model: token choice, stop handling, detokenising deltas, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kubelora_server.engine.config import parse_args
from kubelora_server.engine.protocol import ChatCompletionRequest, CompletionRequest, EngineError
from kubelora_server.engine.sampling import SamplingParams, TextAssembler, choose_token, token_logprob

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "User", 7: ":", 8: "\xe2", 9: "\x82\xac"}


def decode(ids: list[int]) -> str:
    """A byte-level toy: ids 8+9 together are the UTF-8 bytes of the euro sign."""
    raw = "".join(VOCAB[i] for i in ids).encode("latin-1")
    return raw.decode("utf-8", errors="replace")


def feed(asm: TextAssembler, ids: list[int]) -> list[str]:
    return [asm.add(i) for i in ids]


def test_deltas_concatenate_to_the_text() -> None:
    asm = TextAssembler(decode)
    deltas = feed(asm, [1, 2, 3, 4])
    assert deltas == ["Hel", "lo", " wor", "ld"] and asm.finish() == ""


def test_partial_multibyte_characters_are_held_back() -> None:
    asm = TextAssembler(decode)
    assert feed(asm, [1, 8]) == ["Hel", ""]
    assert asm.add(9) == "\u20ac"


def test_stop_string_is_cut_and_its_prefix_never_leaks() -> None:
    asm = TextAssembler(decode, ["\nUser:"])
    deltas = feed(asm, [1, 2, 5, 6])
    assert deltas == ["Hel", "lo", "", ""], "'\\n' and '\\nUser' could still become the stop string"
    assert asm.add(7) == "" and asm.stopped
    assert asm.text == "Hello" and asm.finish() == ""


def test_held_back_text_that_does_not_become_a_stop_is_released() -> None:
    asm = TextAssembler(decode, ["\nUser:"])
    assert feed(asm, [1, 5]) == ["Hel", ""]
    assert asm.add(3) == "\n wor"
    asm.add(5)
    assert asm.finish() == "\n"


def test_no_stop_before_min_tokens_but_one_ending_after_it_counts() -> None:
    asm = TextAssembler(decode, ["lo"])
    assert asm.add(1, may_stop=False) == "Hel"
    assert asm.add(2, may_stop=False) == "lo", "a stop string inside the first min_tokens is plain text"
    assert asm.add(3) == " wor" and not asm.stopped
    assert asm.add(2) == "" and asm.stopped and asm.stop_reason == "lo" and asm.text == "Hello wor"
    spanning = TextAssembler(decode, ["lo w"])
    spanning.add(1, may_stop=False)
    spanning.add(2, may_stop=False)
    spanning.add(3)
    assert spanning.stopped and spanning.text == "Hel", "a stop string that ends after min_tokens counts"


def test_banned_tokens_never_win() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert choose_token(logits, SamplingParams(max_tokens=1, temperature=0.0), None, banned=[1]) == 2
    gen = torch.Generator().manual_seed(0)
    picks = {choose_token(logits, SamplingParams(max_tokens=1), gen, banned=[1]) for _ in range(50)}
    assert 1 not in picks


def test_token_logprob_is_raw_log_softmax_with_rank_and_top() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    expected = torch.log_softmax(logits, -1)
    entry = token_logprob(logits, 2, 2)
    assert entry.logprob == pytest.approx(float(expected[2])) and entry.rank == 2
    assert [t for t, _ in entry.top] == [1, 2]
    assert [t for t, _, _ in entry.ranked()] == [2, 1], "the chosen token first, then the top ones not listed"
    assert [r for _, _, r in entry.ranked()] == [2, 1]
    assert len(token_logprob(logits, 0, -1).top) == 4 and token_logprob(logits, 0, 0).top == ()


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert choose_token(logits, SamplingParams(max_tokens=1, temperature=0.0), None) == 1
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draws = [choose_token(logits, params, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1, "the same seed draws the same token"
    top1 = SamplingParams(max_tokens=1, temperature=2.0, top_k=1)
    assert {choose_token(logits, top1, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    assert {choose_token(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(20)} == {1}


def test_cli_accepts_vllm_flags_and_ignores_unknown_ones() -> None:
    args = parse_args(
        [
            "--model",
            "pvc://models/tiny",
            "--served-model-name",
            "tiny",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-lora-rank",
            "64",
            "--max-cpu-loras",
            "4",
            "--max-model-len",
            "512",
            "--gpu-memory-utilization",
            "0.9",
            "--lora-modules",
            "a=/x/a",
            "b=/x/b",
        ]
    )
    assert (args.model, args.served_model_name, args.max_loras, args.max_cpu_loras) == (
        "pvc://models/tiny",
        "tiny",
        2,
        4,
    )
    assert args.max_lora_rank == 64 and args.max_model_len == 512
    assert args.lora_modules == {"a": "/x/a", "b": "/x/b"}
    assert args.ignored == ("--gpu-memory-utilization", "0.9")
    assert parse_args(["--model", "org/m", "--revision", "v2"]).revision == "v2"
    defaults = parse_args(["--model", "/m"])
    assert (defaults.served_model_name, defaults.max_loras, defaults.max_cpu_loras, defaults.max_lora_rank) == (
        "/m",
        1,
        1,
        16,
    )


def test_lora_modules_in_vllms_json_form() -> None:
    # vLLM's own test spelling (tests/entrypoints/openai/test_lora_adapters.py)
    module = json.dumps({"name": "zephyr-lora", "path": "/x/zephyr", "base_model_name": "tiny"})
    args = parse_args(["--model", "/m", "--enable-lora", "--lora-modules", module, "b=/x/b"])
    assert args.lora_modules == {"zephyr-lora": "/x/zephyr", "b": "/x/b"}
    for bad in ('{"name": "x"}', "{not json"):
        with pytest.raises(SystemExit):
            parse_args(["--model", "/m", "--enable-lora", "--lora-modules", bad])


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--model", "/m", "--max-lora-rank", "12"],
        ["--model", "/m", "--max-loras", "4", "--max-cpu-loras", "2"],
        ["--model", "/m", "--lora-modules", "a=/x"],
        ["--model", "/m", "stray"],
    ],
)
def test_cli_rejects_what_vllm_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_requests_accept_openai_shapes() -> None:
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "a",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 5,
            "stop": "x",
            "logit_bias": {},
            "user": "u",
        }
    )
    assert chat.messages[0].text() == "hi" and chat.requested_max_tokens() == 5 and chat.stop_list() == ["x"]
    assert CompletionRequest.model_validate({"prompt": "p"}).requested_max_tokens() == 16
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]


def test_engine_error_body_is_vllm_shaped() -> None:
    err = EngineError(404, "NotFoundError", "The model `x` does not exist.", "model")
    assert err.body() == {
        "error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}
    }
