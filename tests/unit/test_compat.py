"""Adapter/deployment compatibility: peft type, base model (normalised spellings), rank."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.reasons import Reason
from kubelora.api.runtime import AdapterManifest
from kubelora_server.agent.compat import adapter_rank, base_model_aliases, check_compatible
from kubelora_server.peft_rules import vllm_refusal_message, vllm_refusals


def manifest(base: str, peft_type: str = "LORA") -> AdapterManifest:
    return AdapterManifest(
        digest="sha256:" + "0" * 64,
        files={},
        size_bytes=0,
        base_model=base,
        peft_type=peft_type,
        rank=8,
        lora_alpha=16,
        target_modules=["q_proj"],
        method="lora",
        created_at="2026-01-01T00:00:00Z",
    )


def config(base: str | None = "/mnt/pvc/models/llama", r: int = 8, **extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"],
            "base_model_name_or_path": base, **extra}


@pytest.mark.parametrize(
    ("declared", "served"),
    [
        ("/mnt/pvc/models/llama", "pvc://models/llama"),
        ("/mnt/pvc/models/llama/", "pvc://models/llama"),
        ("pvc://models/llama", "pvc://models/llama/"),
        ("/data/llama", "file:///data/llama"),
        ("meta-llama/Llama-3.1-8B", "hf://meta-llama/Llama-3.1-8B"),
        ("meta-llama/Llama-3.1-8B", "hf://meta-llama/Llama-3.1-8B@main"),
        (
            "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc123",
            "hf://meta-llama/Llama-3.1-8B",
        ),
        ("s3://models/llama", "s3://models/llama/"),
    ],
)
def test_same_base_in_different_spellings_matches(declared: str, served: str) -> None:
    assert check_compatible(config(declared), None, served, 64) is None


def test_manifest_base_rescues_a_trainer_local_path() -> None:
    odd = config("/tmp/trainer-scratch/model")
    assert check_compatible(odd, manifest("pvc://models/llama"), "pvc://models/llama", 64) is None


def test_manifest_base_decides_over_the_config() -> None:
    # The trainer keeps peft's base_model_name_or_path (a path in its pod, or a Hub repo id); the KubeLoRA URI
    # lives in the manifest, and that is what is compared when there is one.
    cfg = config("/mnt/pvc/models/llama")
    bad = check_compatible(cfg, manifest("pvc://models/qwen"), "pvc://models/llama", 64)
    assert bad is not None and bad.reason == Reason.BASE_MODEL_MISMATCH
    assert "kubelora-manifest.json baseModel" in bad.message
    hub = config("meta-llama/Llama-3.1-8B")
    assert check_compatible(hub, manifest("hf://meta-llama/Llama-3.1-8B@v1"), "hf://meta-llama/Llama-3.1-8B@v1",
                            64) is None


def test_different_base_is_a_mismatch_naming_both() -> None:
    bad = check_compatible(config("/mnt/pvc/models/qwen"), manifest("pvc://models/qwen"), "pvc://models/llama", 64)
    assert bad is not None and bad.reason == Reason.BASE_MODEL_MISMATCH
    assert "pvc://models/qwen" in bad.message and "pvc://models/llama" in bad.message


def test_adapter_without_any_base_is_a_mismatch() -> None:
    bad = check_compatible(config(None), None, "pvc://models/llama", 64)
    assert bad is not None and bad.reason == Reason.BASE_MODEL_MISMATCH


def test_pvc_root_override_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELORA_PVC_ROOT", "/srv/claims")
    assert "/srv/claims/models/llama" in base_model_aliases("pvc://models/llama")
    assert check_compatible(config("/srv/claims/models/llama"), None, "pvc://models/llama", 64) is None


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "IA3", ""])
def test_non_lora_adapters_are_refused(peft_type: str) -> None:
    cfg = config()
    cfg["peft_type"] = peft_type
    bad = check_compatible(cfg, None, "pvc://models/llama", 64)
    assert bad is not None and bad.reason == Reason.NOT_LORA


def test_manifest_peft_type_is_checked_too() -> None:
    bad = check_compatible(config(), manifest("pvc://models/llama", "IA3"), "pvc://models/llama", 64)
    assert bad is not None and bad.reason == Reason.NOT_LORA


def test_rank_limit_uses_the_largest_rank_including_rank_pattern() -> None:
    assert adapter_rank(config(r=8, rank_pattern={"q_proj": 32})) == 32
    ok = check_compatible(config(r=16), None, "pvc://models/llama", 16)
    assert ok is None
    bad = check_compatible(config(r=8, rank_pattern={"q_proj": 32}), None, "pvc://models/llama", 16)
    assert bad is not None and bad.reason == Reason.RANK_TOO_LARGE and "32" in bad.message


# vLLM v0.34's PEFTHelper cases (tests/lora/test_peft_helper.py, tests/entrypoints/openai/test_lora_adapters.py
# adapted to the pinned release's wording): the config change and the words of vLLM's refusal.
VLLM_REFUSES = [
    ({"r": 1024}, "LoRA rank 1024 is greater than max_lora_rank 64.", Reason.RANK_TOO_LARGE),
    ({"rank_pattern": {"q_proj": 128}}, "LoRA rank 128 is greater than max_lora_rank 64.", Reason.RANK_TOO_LARGE),
    ({"bias": "all"}, "Adapter bias is not supported.", Reason.UNSUPPORTED_ADAPTER),
    ({"bias": "lora_only"}, "Adapter bias is not supported.", Reason.UNSUPPORTED_ADAPTER),
    ({"use_dora": True}, "vLLM does not yet support DoRA.", Reason.UNSUPPORTED_ADAPTER),
    ({"lora_bias": True}, "vLLM does not support LoRA bias (lora_bias).", Reason.UNSUPPORTED_ADAPTER),
    ({"modules_to_save": ["lm_head"]}, "Unsupported modules_to_save: ['lm_head']", Reason.UNSUPPORTED_ADAPTER),
    ({"init_lora_weights": "pissa"}, "vLLM does not support init_lora_weights='pissa'.", Reason.UNSUPPORTED_ADAPTER),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'", Reason.UNSUPPORTED_ADAPTER),
    ({"init_lora_weights": "olora"}, "Inits such as PiSSA, OLoRA, CorDA and LoftQ", Reason.UNSUPPORTED_ADAPTER),
    ({"init_lora_weights": "loftq"}, "path_initial_model_for_weight_conversion", Reason.UNSUPPORTED_ADAPTER),
    ({"layer_replication": [[0, 4], [2, 5]]}, "vLLM does not support layer_replication.", Reason.UNSUPPORTED_ADAPTER),
    ({"alora_invocation_tokens": [1, 2]}, "Activated LoRA (aLoRA)", Reason.UNSUPPORTED_ADAPTER),
    ({"use_qalora": True}, "vLLM does not support QALoRA.", Reason.UNSUPPORTED_ADAPTER),
    ({"r": 0}, "LoRA rank `r` must be a positive integer, got 0.", Reason.UNSUPPORTED_ADAPTER),
]


@pytest.mark.parametrize(("change", "words", "reason"), VLLM_REFUSES)
def test_what_vllm_refuses_is_refused_before_loading_in_its_words(change: dict[str, Any], words: str,
                                                                   reason: str) -> None:
    bad = check_compatible(config(**change), None, "pvc://models/llama", 64)
    assert bad is not None and bad.reason == reason and words in bad.message


def test_vllm_joins_all_its_refusals_into_one_message() -> None:
    message = vllm_refusal_message({**config(r=128), "use_dora": True, "bias": "all"}, 64)
    assert message == ("vLLM does not yet support DoRA. LoRA rank 128 is greater than max_lora_rank 64. "
                       "Adapter bias is not supported.")
    (missing,) = vllm_refusals({"r": 8}, 64)
    assert missing.startswith("Missing required configuration fields: ") and "lora_alpha" in missing


@pytest.mark.parametrize("change", [{"init_lora_weights": True}, {"init_lora_weights": False},
                                    {"init_lora_weights": "gaussian"}, {"init_lora_weights": "eva"},
                                    {"modules_to_save": ["score"]}, {"task_type": "SEQ_CLS"},
                                    {"modules_to_save": None, "bias": "none", "use_dora": False},
                                    {"use_rslora": True}, {"rank_pattern": {"q_proj": 16}}])
def test_what_vllm_serves_passes(change: dict[str, Any]) -> None:
    assert vllm_refusals(config(**change), 64) == []
    assert check_compatible(config(**change), None, "pvc://models/llama", 64) is None
