"""The trainer for real on a tiny model (CPU): LoRA and QLoRA learn, the adapter reloads and verifies,
bad data fails fast with file and line, progress is sane. In-process, so libraries are imported once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.digest import DigestMismatchError
from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_local.tinymodel import write_chat_dataset

pytestmark = pytest.mark.integration

FAST = {
    "learningRate": 5e-3,
    "batchSize": 4,
    "gradientAccumulationSteps": 1,
    "scheduler": "constant",
    "warmupRatio": 0,
    "maxSeqLength": 256,
    "saveSteps": 10,
    "evalSteps": 10,
}


def make_run(
    tmp_path: Path, base: Path, data: str, method: str = "lora", dataset: dict[str, Any] | None = None, **training: Any
) -> TrainerRunConfig:
    return TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 1,
            "spec": {
                "baseModel": {"uri": f"file://{base}"},
                "dataset": {"uri": data, **(dataset or {})},
                "output": {"uri": f"file://{tmp_path}/out"},
                "method": method,
                "lora": {"r": 8, "alpha": 16},
                "training": {**FAST, **training},
            },
        }
    )


def write_config(tmp_path: Path, run: TrainerRunConfig) -> str:
    path = tmp_path / "job.json"
    path.write_text(run.model_dump_json(by_alias=True))
    return str(path)


def losses_went_down(metrics: dict[str, float]) -> bool:
    return metrics["final_loss"] < metrics["first_loss"] - 0.1


def assert_standard_peft_adapter(rev: Path, enc: Any, want: Any) -> None:
    """The published folder, copied unchanged (no KubeLoRA code, no URI translation), loads with peft's own
    entry points and gives the trained model's logits."""
    import shutil

    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    plain = rev.parent / "copied-adapter"
    shutil.copytree(rev, plain)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(plain))  # finds the base by base_model_name_or_path
    cfg = json.loads((plain / "adapter_config.json").read_text())
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
                                         str(plain))
    with torch.no_grad():
        for model in (auto, explicit):
            model.eval()
            torch.testing.assert_close(model(**enc).logits, want, rtol=0, atol=1e-5)


def test_lora_learns_publishes_reloads_and_verifies(tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from kubelora_trainer.progress import RecordingSink
    from kubelora_trainer.publish import verify_adapter_dir
    from kubelora_trainer.train import Hooks, train

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=64)
    run = make_run(tmp_path, tiny_llama, f"file://{data}", maxSteps=20)
    sink = RecordingSink()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    trained: dict[str, Any] = {}

    class KeepLogits(TrainerCallback):  # type: ignore[misc]
        """The trained model's own logits, taken in the trainer process before anything is saved."""

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            model.eval()
            with torch.no_grad():
                trained["logits"] = model(**enc).logits.detach().clone()

    result = train(run, Hooks(sinks=[sink], progress_interval=0, extra_callbacks=[KeepLogits()]))

    assert result.ok and result.reason == "Completed"
    m = result.metrics
    assert m["global_step"] == 20
    assert losses_went_down(m), m
    assert m["eval_loss"] < 6.5 and m["tokens_per_second"] > 0

    # The adapter is complete and verifies; the KubeLoRA URI of its base is in the manifest, peft's own
    # base_model_name_or_path is the path the trainer loaded, and the model card is one of its files.
    rev = tmp_path / "out" / "rev-1"
    manifest = verify_adapter_dir(rev)
    assert result.adapter is not None and manifest.digest == result.adapter.digest
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(manifest.files)
    assert manifest.base_model == f"file://{tiny_llama}" == result.adapter.base_model
    assert manifest.metrics["final_loss"] == m["final_loss"] and manifest.rank == 8
    cfg = json.loads((rev / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama)
    card = (rev / "README.md").read_text()
    assert f"file://{data}" in card and re.search(r"`sha256:[0-9a-f]{64}`", card)
    assert f"| final_loss | `{m['final_loss']:.6g}` |" in card and "| r | `8` |" in card
    # Checkpoints (optimizer state) live beside the adapter, never in it.
    assert not (rev / "checkpoints").exists()
    assert sorted((tmp_path / "out" / "checkpoints" / "rev-1").glob("checkpoint-*"))
    assert set(manifest.files) == {p.relative_to(rev).as_posix() for p in rev.rglob("*") if p.is_file()} - {
        MANIFEST_FILE}

    # Reload with peft and generate; the trained adapter changes the base model's output.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        base_logits = base(**enc).logits
    model = PeftModel.from_pretrained(base, str(rev))
    with torch.no_grad():
        reloaded = model(**enc).logits
        assert (reloaded - base_logits).abs().max() > 1e-3
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    torch.testing.assert_close(reloaded, trained["logits"], rtol=0, atol=1e-5)
    assert_standard_peft_adapter(rev, enc, trained["logits"])

    # Progress: monotonic steps, sane percent and ETA, the last checkpoint named as a URI.
    ups = sink.updates
    assert [u.step for u in ups] == sorted(u.step for u in ups)
    assert all(u.total_steps == 20 and 0 <= u.percent <= 100 for u in ups)
    mid = [u for u in ups if 0 < u.step < 20]
    assert mid and all(u.eta_seconds is not None and u.eta_seconds >= 0 for u in mid)
    assert any(u.loss is not None and u.learning_rate == pytest.approx(5e-3) for u in mid)
    assert any(u.tokens_per_second for u in ups)
    last = ups[-1]
    assert (last.step, last.percent, last.eta_seconds) == (20, 100, 0)
    assert last.eval_loss is not None
    assert last.last_checkpoint == f"file://{tmp_path}/out/checkpoints/rev-1/checkpoint-20"

    # A retried pod after success publishes nothing new.
    again = train(run, Hooks(sinks=[]))
    assert again.adapter == result.adapter and again.message == "adapter already published"

    # Tampering with any file is caught.
    weights = rev / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(DigestMismatchError, match=r"adapter_model\.safetensors: sha256"):
        verify_adapter_dir(rev)


def test_qlora_trains_on_a_4bit_base(tiny_llama: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    from kubelora_trainer.train import Hooks, train

    seen: dict[str, int] = {}

    class Count4bit(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            seen[f"step{state.global_step}"] = sum(isinstance(x, bnb.nn.Linear4bit) for x in model.modules())

    def check_model(trainer: Any) -> None:
        layers = [x for x in trainer.model.modules() if isinstance(x, bnb.nn.Linear4bit)]
        seen["before"] = len(layers)
        assert all(x.weight.dtype == __import__("torch").uint8 for x in layers)
        # The QLoRA recipe's defaults: NF4 with double quantization (the absmax constants quantized again).
        states = [x.weight.quant_state for x in layers]
        seen["nf4"] = sum(q.quant_type == "nf4" for q in states)
        seen["double_quant"] = sum(bool(q.nested) for q in states)

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=64)
    run = make_run(tmp_path, tiny_llama, f"file://{data}", method="qlora", maxSteps=20, saveSteps=20)
    result = train(run, Hooks(sinks=[], on_trainer=check_model, extra_callbacks=[Count4bit()]))
    assert result.ok
    # 2 layers x 7 projections of the base are 4-bit during the whole run (lm_head stays full precision).
    assert seen["before"] == 14 and seen["step1"] == 14 and seen["step20"] == 14
    assert seen["nf4"] == 14 and seen["double_quant"] == 14
    assert result.metrics["base_linear4bit_layers"] == 14
    assert losses_went_down(result.metrics), result.metrics
    manifest = json.loads((tmp_path / "out" / "rev-1" / MANIFEST_FILE).read_text())
    assert manifest["method"] == "qlora"


@pytest.mark.parametrize(("fmt", "arch"), [("prompt-completion", "qwen2"), ("text", "llama")])
def test_other_formats_and_architectures(fmt: str, arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from kubelora_trainer.publish import verify_adapter_dir
    from kubelora_trainer.train import Hooks, train

    base = request.getfixturevalue(f"tiny_{arch}")
    data = write_chat_dataset(tmp_path / "d.jsonl", n=32, fmt=fmt)
    run = make_run(tmp_path, base, f"file://{data}", maxSteps=6, saveSteps=6, dataset={"evalSplit": 0.0})
    result = train(run, Hooks(sinks=[]))
    assert result.ok and result.validation is not None and result.validation.format == fmt
    assert result.validation.eval_rows == 0 and "eval_loss" not in result.metrics
    verify_adapter_dir(tmp_path / "out" / "rev-1")


BAD_CASES = {
    "empty": ([], "is empty"),
    "invalid-json": (
        [
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            "",
            '{"messages": [}',
        ],
        "line 3: invalid JSON",
    ),
    "missing-key": (['{"text": "fine"}', '{"txt": "typo"}'], 'line 2: missing key "text"'),
    "unknown-role": (
        [
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            '{"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        ],
        r"line 2: messages\[1\] has unknown role 'human'",
    ),
    "too-long": (
        ['{"text": "short"}'] * 4 + [json.dumps({"text": "the sky is blue " * 40})],
        r"line 5: \d{3} tokens: longer than spec\.training\.maxSeqLength \(64 tokens\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("mode", ["train", "validate"])
def test_bad_data_exits_2_naming_file_and_line(
    case: str, mode: str, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubelora_trainer.__main__ import main

    lines, expected = BAD_CASES[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text("\n".join(lines))
    run = make_run(tmp_path, tiny_llama, f"file://{data}", maxSteps=2, maxSeqLength=64)
    term = tmp_path / "termination-log"
    argv = ["--config", write_config(tmp_path, run), "--termination-log", str(term)]
    code = main([*argv, "--validate-only"] if mode == "validate" else argv)
    result = json.loads(term.read_text())
    assert code == 2, result
    assert result["ok"] is False and result["reason"] == "InvalidDataset"
    assert f"file://{data}" in result["message"]
    assert re.search(expected, result["message"]), result["message"]
    assert "Fix:" in result["message"]
    assert json.loads(capsys.readouterr().out) == result
    assert not (tmp_path / "out").exists()  # nothing was trained or published


def test_missing_base_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubelora_trainer.__main__ import main

    data = write_chat_dataset(tmp_path / "chat.jsonl", n=8)
    (tmp_path / "empty-model").mkdir()
    for base, expected in ((tmp_path / "nope", "is not a directory"), (tmp_path / "empty-model", "no config.json")):
        run = make_run(tmp_path, base, f"file://{data}")
        assert main(["--config", write_config(tmp_path, run), "--termination-log", ""]) == 2
        result = json.loads(capsys.readouterr().out)
        assert result["reason"] == "BaseModelUnavailable" and expected in result["message"]


def test_validate_only_cli_reports_stats(tiny_llama: Path, tmp_path: Path) -> None:
    """A real subprocess: exit code, stdout JSON and the termination log as the operator reads them."""
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=40)
    run = make_run(tmp_path, tiny_llama, f"file://{data}", dataset={"evalSplit": 0.25})
    term = tmp_path / "term"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubelora_trainer",
            "--config",
            write_config(tmp_path, run),
            "--validate-only",
            "--termination-log",
            str(term),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(term.read_text()) == result
    assert result["ok"] and result["reason"] == "ValidationPassed"
    v = result["validation"]
    assert (v["trainRows"], v["evalRows"], v["format"]) == (30, 10, "messages")
    assert 0 < v["meanTokens"] <= v["maxTokens"] <= 256 and v["totalTokens"] > 0
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing:FutureWarning", "ignore:Paged optimizers are not supported on CPU:UserWarning"
)
def test_gpu_mapping_is_accepted_by_trl_and_trains(tiny_llama: Path, tmp_path: Path) -> None:
    """No GPU here: build the GPU plan (packing, checkpointing, paged optimizer, best model at end) and run it
    with only the CPU-impossible flags swapped, so a renamed or conflicting TRL argument fails in CI."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubelora_local.tinymodel import sample_rows
    from kubelora_trainer import mapping
    from kubelora_trainer.data import DatasetSplits, Record
    from kubelora_trainer.train import to_dataset

    run = make_run(
        tmp_path,
        tiny_llama,
        "file:///unused.jsonl",
        maxSteps=4,
        saveSteps=2,
        evalSteps=2,
        gradientCheckpointing=True,
        optimizer="paged_adamw_32bit",
    )
    gpu = mapping.Device("cuda", bf16=True, flash_attention=False)
    kw = mapping.sft_kwargs(
        run.spec, output_dir=str(tmp_path / "ckpt"), device=gpu, data_format="messages", has_eval=True, train_rows=28
    )
    assert kw["packing"] and kw["activation_checkpointing"] and kw["bf16"] and kw["load_best_model_at_end"]
    kw.update(use_cpu=True, bf16=False)
    records = [Record(r, "mem", f"row {i}") for i, r in enumerate(sample_rows(32))]
    splits = DatasetSplits("messages", records[:28], records[28:])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama),
        args=SFTConfig(**kw),
        train_dataset=to_dataset(splits.train),
        eval_dataset=to_dataset(splits.eval),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama),
        peft_config=LoraConfig(**mapping.lora_kwargs(run.spec.lora)),
    )
    assert trainer.padding_free  # bfd packing implies padding-free rows
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.state.best_model_checkpoint


def test_template_without_generation_markers_trains_on_last_assistant_turn(tiny_llama: Path, tmp_path: Path) -> None:
    """A chat template TRL cannot mark assistant turns in: rows become prompt/completion at the last assistant
    message, so the loss still covers assistant text only (instead of failing or training on the prompt)."""
    import shutil

    from transformers import AutoTokenizer

    from kubelora_trainer.train import Hooks, train
    from kubelora_trainer.validate import plan_loss

    base = tmp_path / "plain-template"
    shutil.copytree(tiny_llama, base)
    template = (base / "chat_template.jinja").read_text()
    plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (base / "chat_template.jinja").write_text(plain)
    plan = plan_loss(AutoTokenizer.from_pretrained(base), "messages")
    assert plan.convert_to_prompt_completion and not plan.assistant_only_loss

    captured: dict[str, Any] = {}
    data = write_chat_dataset(tmp_path / "chat.jsonl", n=32)
    run = make_run(tmp_path, base, f"file://{data}", maxSteps=4, saveSteps=4, dataset={"evalSplit": 0})
    result = train(run, Hooks(sinks=[], on_trainer=lambda t: captured.update(row=t.train_dataset[0])))
    assert result.ok
    row = captured["row"]
    supervised = [tok for tok, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
    text = AutoTokenizer.from_pretrained(base).decode(supervised)
    assert "user" not in text and "<|im_start|>" not in text
    assert text.startswith("The sky is blue.<|im_end|>")
