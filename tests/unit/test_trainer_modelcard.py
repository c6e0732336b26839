"""The published adapter keeps peft's fields (base_model_name_or_path, revision) and carries a model card."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.runtime import TrainerRunConfig
from kubelora_trainer.modelcard import render_card
from kubelora_trainer.publish import peft_base_fields


def run(base: str) -> TrainerRunConfig:
    return TrainerRunConfig.model_validate({
        "name": "bot", "namespace": "team", "revision": 3,
        "spec": {"baseModel": {"uri": base}, "dataset": {"uri": "s3://data/chat.jsonl"},
                 "output": {"uri": "s3://out/bot"}, "method": "lora",
                 "lora": {"r": 8, "alpha": 16}, "training": {"learningRate": 1e-4, "maxSteps": 30}},
    })


@pytest.mark.parametrize(
    ("uri", "loaded", "want"),
    [
        pytest.param("hf://Qwen/Qwen2.5-0.5B@abc123", "Qwen/Qwen2.5-0.5B",
                     {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "revision": "abc123"}, id="hub-revision"),
        pytest.param("hf://Qwen/Qwen2.5-0.5B", "/cache/x",
                     {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "revision": None}, id="hub"),
        pytest.param("pvc://models/tiny", "/mnt/pvc/models/tiny",
                     {"base_model_name_or_path": "/mnt/pvc/models/tiny", "revision": None}, id="pvc-path"),
        pytest.param("s3://models/tiny", "/tmp/kubelora/models/0123",
                     {"base_model_name_or_path": "/tmp/kubelora/models/0123", "revision": None}, id="s3-download"),
    ],
)
def test_peft_fields_are_what_from_pretrained_takes(uri: str, loaded: str, want: dict[str, Any]) -> None:
    assert peft_base_fields(uri, loaded) == want


def test_card_names_base_dataset_digest_hyperparameters_and_metrics() -> None:
    cfg = {"base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
           "target_modules": ["q_proj", "v_proj"]}
    card = render_card(run("hf://Qwen/Qwen2.5-0.5B@abc123"), cfg, {"final_loss": 1.25, "global_step": 30.0},
                       "sha256:" + "ab" * 32)
    front = card.split("---")[1]
    assert "base_model: Qwen/Qwen2.5-0.5B" in front and "library_name: peft" in front
    for text in ("hf://Qwen/Qwen2.5-0.5B@abc123", "s3://data/chat.jsonl", "sha256:" + "ab" * 32,
                 '["q_proj", "v_proj"]', "| learning_rate | `0.0001` |", "| final_loss | `1.25` |",
                 "| global_step | `30` |", "team/bot", "revision 3"):
        assert text in card, text


def test_card_front_matter_has_no_hub_base_for_a_volume_model() -> None:
    card = render_card(run("pvc://models/tiny"), {"base_model_name_or_path": "/mnt/pvc/models/tiny"}, {}, "")
    assert "base_model:" not in card.split("---")[1]
    assert "/mnt/pvc/models/tiny" in card and "(none recorded)" in card
