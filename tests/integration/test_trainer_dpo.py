"""objective: dpo for real on a tiny model (CPU): the reward margin rises, progress and metrics carry the DPO
numbers, the adapter publishes and verifies; each malformed preference dataset fails pre-flight with file and
line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import TrainerRunConfig

from .test_trainer import make_run

pytestmark = pytest.mark.integration

QUESTIONS = ["What colour is the sky?", "Say hello.", "Name a fruit.", "Count to three."]
GOOD = ["The sky is blue.", "Hello, nice to meet you!", "An apple.", "One, two, three."]


def preference_rows(n: int, conversational: bool) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        q, good = QUESTIONS[i % 4], GOOD[i % 4]
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": q}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": "No."}]})
        else:
            rows.append({"prompt": q, "chosen": " " + good, "rejected": " No."})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_run(tmp_path: Path, base: Path, data: Path, **training: Any) -> TrainerRunConfig:
    wire = make_run(tmp_path, base, f"file://{data}", **training).model_dump(by_alias=True, exclude_none=True)
    wire["spec"].update(objective="dpo", dpo={"beta": 0.1})
    wire["spec"]["dataset"]["evalSplit"] = 0.25
    return TrainerRunConfig.model_validate(wire)


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
def test_dpo_raises_the_reward_margin_and_publishes(conversational: bool, tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from kubelora_trainer.progress import RecordingSink
    from kubelora_trainer.publish import verify_adapter_dir
    from kubelora_trainer.train import Hooks, train, validate_only

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32, conversational))
    run = dpo_run(tmp_path, tiny_llama, data, maxSteps=12, evalSteps=6, saveSteps=6)
    checked = validate_only(run)
    assert checked.validation is not None and checked.validation.format == "preference"
    assert (checked.validation.train_rows, checked.validation.eval_rows) == (24, 8)

    seen: dict[str, Any] = {}

    def inspect(trainer: Any) -> None:
        seen["kind"] = type(trainer).__name__
        seen["ref_model"] = trainer.ref_model
        seen["peft"] = isinstance(trainer.model, PeftModel)

    sink = RecordingSink()
    result = train(run, Hooks(sinks=[sink], progress_interval=0, on_trainer=inspect))
    assert seen == {"kind": "DPOTrainer", "ref_model": None, "peft": True}, "the reference is the base, not a copy"
    m = result.metrics
    assert result.ok and m["global_step"] == 12
    assert m["first_reward_margin"] == pytest.approx(0.0, abs=1e-6), "the adapter starts as the base (B = 0)"
    assert m["reward_margin"] > m["first_reward_margin"] + 0.1, m
    assert m["reward_accuracy"] >= 0.75 and "eval_reward_margin" in m, m
    margins = [p.reward_margin for p in sink.updates if p.reward_margin is not None]
    assert margins and margins[-1] > margins[0], margins
    assert result.adapter is not None
    manifest = verify_adapter_dir(tmp_path / "out" / "rev-1")
    assert manifest.metrics["reward_margin"] == m["reward_margin"]


MALFORMED = [
    pytest.param([{"prompt": "Hi", "chosen": " Hello."}], 'missing key(s) \'rejected\'', id="no-rejected"),
    pytest.param([{"prompt": "Hi", "chosen": " Hello.", "rejected": " Hello."}], "identical", id="same-answers"),
    pytest.param([{"prompt": "Hi", "chosen": "", "rejected": " Go."}], '"chosen" is empty', id="empty-chosen"),
    pytest.param([{"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": " Go."}],
                 "must all be strings or all be lists of messages", id="mixed-kinds"),
    pytest.param([{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Hello."}],
                   "rejected": [{"role": "assistant", "content": "Go."}]}], '"chosen" has no assistant message',
                 id="no-assistant-answer"),
    pytest.param([{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                   "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Go."}]}],
                 "must share every turn before their last assistant message", id="implicit-prompts-differ"),
    pytest.param([{"prompt": "Hi", "chosen": " Hello.", "rejected": " Go."}, {"chosen": " Hi", "rejected": " Go."}],
                 'missing key "prompt"', id="string-row-without-prompt"),
    pytest.param([{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "A"}],
                   "rejected": [{"role": "assistant", "content": "B"}]}, {"prompt": "Hi", "chosen": " A",
                                                                           "rejected": " B"}],
                 "mixes string rows and conversational rows", id="string-and-conversational-rows"),
    pytest.param([{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "robot", "content": "A"}],
                   "rejected": [{"role": "assistant", "content": "B"}]}], "unknown role 'robot'", id="bad-role"),
]


@pytest.mark.parametrize(("bad_rows", "words"), MALFORMED)
def test_each_malformed_preference_dataset_fails_preflight_with_file_and_line(
        bad_rows: list[dict[str, Any]], words: str, tiny_llama: Path, tmp_path: Path) -> None:
    from kubelora_trainer.errors import InvalidDatasetError
    from kubelora_trainer.train import validate_only

    good = preference_rows(4, conversational=isinstance(bad_rows[0].get("chosen"), list))
    data = write_jsonl(tmp_path / "prefs.jsonl", [*good, *bad_rows])
    with pytest.raises(InvalidDatasetError) as info:
        validate_only(dpo_run(tmp_path, tiny_llama, data))
    message = info.value.message
    line = len(good) + len(bad_rows)
    assert f"file://{data} line {line}" in message, message
    assert words in message, message
    assert info.value.reason == "InvalidDataset"


def test_preflight_renders_preference_rows_with_the_chosen_answer_marked(tiny_llama: Path, tmp_path: Path) -> None:
    from kubelora_trainer.train import validate_only

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8, conversational=True))
    rendered = validate_only(dpo_run(tmp_path, tiny_llama, data)).validation.rendered  # type: ignore[union-attr]
    assert rendered and all("<|im_start|>assistant\n[[" in r.text and "No." not in r.text for r in rendered), rendered
