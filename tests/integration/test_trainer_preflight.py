"""Pre-flight additions with the real tokenizer and trainer: the rendered rows' loss mask is the one TRL's
SFTTrainer trains on (every format), the validate-only result carries the rendered rows, and the
overfit-batch smoke run passes on the demo setup, fails a learning rate that cannot learn, and leaves the
base model exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.runtime import EXIT_BAD_INPUT

from .test_trainer import make_run, write_config
from .test_trainer_evaluation import demo_model, demo_run, run_trainer  # noqa: F401  (demo_model: a fixture)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", ["messages", "prompt-completion", "text"])
def test_the_rendered_loss_mask_is_the_one_trl_trains_on(fmt: str, tiny_llama: Path, tmp_path: Path) -> None:
    from kubelora_local.tinymodel import write_chat_dataset
    from kubelora_trainer import mapping
    from kubelora_trainer.modelload import load_tokenizer
    from kubelora_trainer.preflight_checks import loss_mask, render
    from kubelora_trainer.train import build_trainer, preflight

    data = write_chat_dataset(tmp_path / "d.jsonl", n=16, fmt=fmt)
    run = make_run(tmp_path, tiny_llama, f"file://{data}", dataset={"format": fmt})
    pre = preflight(run)
    from transformers import AutoModelForCausalLM

    trainer = build_trainer(run, model=AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer=pre.tokenizer,
                            splits=pre.splits, loss=pre.loss, device=mapping.Device("cpu"),
                            output_dir=str(tmp_path / "ckpt"))
    for i in range(3):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        trl_ids = batch["input_ids"][0].tolist()
        trl_mask = [int(x != -100) for x in batch["labels"][0].tolist()]
        ids, mask = loss_mask(load_tokenizer(pre.model_ref), pre.splits.train[i].row, pre.loss)
        assert (ids, mask) == (trl_ids, trl_mask), render(pre.tokenizer, ids, mask)
    [first, _] = pre.stats.rendered
    assert "d.jsonl" in first.source and 0 < first.supervised <= first.tokens
    assert first.supervised == sum(loss_mask(pre.tokenizer, pre.splits.train[0].row, pre.loss)[1])
    assert first.text.startswith("[[") if fmt == "text" else "]]" in first.text and not first.text.startswith("[[")


def test_validate_only_reports_the_rendered_rows(tiny_llama: Path, tmp_path: Path) -> None:
    from kubelora_local.tinymodel import write_chat_dataset

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=20)
    run = make_run(tmp_path, tiny_llama, f"file://{data}")
    proc = subprocess.run([sys.executable, "-m", "kubelora_trainer", "--config", write_config(tmp_path, run),
                           "--validate-only", "--termination-log", ""], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)["validation"]["rendered"]
    assert len(rendered) == 2 and all(r["supervised"] < r["tokens"] for r in rendered)
    text = rendered[0]["text"]
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n[[" in text and text.endswith("]]\n")
    assert "supervised tokens inside [[ ]]" in proc.stderr


def base_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    enc = tokenizer("What colour is the sky?", return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_overfit_batch_passes_fails_and_restores_the_base(demo_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubelora.api.preflight import OverfitBatch
    from kubelora_trainer import mapping
    from kubelora_trainer.preflight_checks import overfit_batch
    from kubelora_trainer.train import preflight

    run = demo_run(tmp_path, demo_model)
    pre = preflight(run)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    tok = AutoTokenizer.from_pretrained(demo_model)
    before = base_logits(model, tok)
    lora = mapping.lora_kwargs(run.spec.lora)
    restored, passed = overfit_batch(model, pre.tokenizer, pre.splits.train, pre.loss, OverfitBatch(), lora, 1e-2)
    assert passed.passed and passed.final_loss <= 0.5 * passed.first_loss, passed
    assert not [n for n, _ in restored.named_modules() if "lora" in n.lower()]
    assert type(restored).__name__ == "LlamaForCausalLM" and (base_logits(restored, tok) == before).all()
    _, failed = overfit_batch(restored, pre.tokenizer, pre.splits.train, pre.loss, OverfitBatch(steps=3), lora, 1e-9)
    assert not failed.passed and "not 50% below the first step's loss" in failed.message


def test_a_run_whose_batch_cannot_be_overfit_fails_before_training(demo_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from kubelora_trainer.__main__ import main

    run = demo_run(tmp_path, demo_model)
    spec = run.spec.wire()
    spec["preflight"] = {"overfitBatch": {"steps": 3, "learningRate": 1e-9}}
    run = run.model_validate({**run.wire(), "spec": spec})
    assert main(["--config", write_config(tmp_path, run), "--termination-log", str(tmp_path / "term")]) \
        == EXIT_BAD_INPUT
    result = json.loads((tmp_path / "term").read_text())
    assert result["reason"] == "PreflightFailed" and result["message"].startswith("preflight.overfitBatch failed: ")
    assert not (tmp_path / "out" / "rev-1").exists() or not any((tmp_path / "out" / "rev-1").iterdir())


def test_a_passing_overfit_check_then_trains_and_publishes(demo_model: Path, tmp_path: Path) -> None:  # noqa: F811
    run = demo_run(tmp_path, demo_model, references=[], samples=0)
    spec = run.spec.wire()
    spec["preflight"] = {"overfitBatch": {}}
    run = run.model_validate({**run.wire(), "spec": spec})
    result = run_trainer(run)
    assert result.ok and result.validation is not None and result.validation.overfit is not None
    assert result.validation.overfit.passed and result.evaluation is not None
    assert result.evaluation.improvement is not None and result.evaluation.improvement > 0.5
