"""Spec -> peft / bitsandbytes / TRL keyword arguments, per device, as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.lorajob import LoRAJobSpec, LoraSpec, QuantizationSpec, TrainingSpec
from kubelora_trainer import mapping
from kubelora_trainer.mapping import Device

CPU = Device("cpu")
GPU = Device("cuda", bf16=True, flash_attention=True)
OLD_GPU = Device("cuda", bf16=False)


def spec(**over: Any) -> LoRAJobSpec:
    body: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/llama"},
        "dataset": {"uri": "pvc://data/t.jsonl"},
        "output": {"uri": "pvc://out/x"},
    }
    body.update(over)
    return LoRAJobSpec.model_validate(body)


def test_lora_kwargs() -> None:
    kw = mapping.lora_kwargs(
        LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True, use_dora=True)
    )
    assert kw == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
        "use_dora": True,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert mapping.lora_kwargs(LoraSpec())["target_modules"] == "all-linear"


def test_precision_plans() -> None:
    assert mapping.plan_precision("lora", None, CPU) == mapping.Precision("float32", False, False)
    assert mapping.plan_precision("lora", None, GPU).model_dtype == "bfloat16"
    old = mapping.plan_precision("lora", None, OLD_GPU)
    assert (old.model_dtype, old.fp16, old.bf16) == ("float16", True, False)
    q_cpu = mapping.plan_precision("qlora", QuantizationSpec(), CPU)
    assert (q_cpu.compute_dtype, q_cpu.bf16, q_cpu.fp16) == ("float32", False, False)
    assert "no native bfloat16" in q_cpu.notes[0]
    assert mapping.plan_precision("qlora", QuantizationSpec(), Device("cpu", bf16=True)).compute_dtype == "bfloat16"
    q_gpu = mapping.plan_precision("qlora", QuantizationSpec(), GPU)
    assert (q_gpu.compute_dtype, q_gpu.bf16) == ("bfloat16", True)
    assert mapping.plan_precision("qlora", QuantizationSpec(), OLD_GPU).compute_dtype == "float16"


def test_bnb_kwargs() -> None:
    q = QuantizationSpec(quant_type="fp4", double_quant=False)
    kw = mapping.bnb_kwargs(q, mapping.plan_precision("qlora", q, CPU))
    assert kw == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
    }


def test_optimizer_mapping() -> None:
    assert mapping.plan_optimizer("paged_adamw_32bit", CPU)[0] == "adamw_torch_fused"
    assert mapping.plan_optimizer("paged_adamw_8bit", CPU)[0] == "adamw_8bit"
    assert mapping.plan_optimizer("paged_adamw_32bit", GPU) == ("paged_adamw_32bit", None)
    assert mapping.plan_optimizer("sgd", CPU) == ("sgd", None)


def test_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    t = TrainingSpec(max_seq_length=512)
    gpu = mapping.plan_batching(t, GPU)
    assert (gpu.name, gpu.packing, gpu.max_length) == ("packing", True, 512)
    cpu = mapping.plan_batching(t, CPU)
    assert (cpu.name, cpu.group_by_length, cpu.packing, cpu.max_length) == ("grouped", True, False, 512)
    monkeypatch.setenv(mapping.CPU_BATCHING_ENV, "padding_free")
    pf = mapping.plan_batching(t, CPU)
    assert (pf.padding_free, pf.max_length) == (True, None)  # TRL refuses max_length without packing
    plain = mapping.plan_batching(TrainingSpec(packing=False), GPU)
    assert (plain.name, plain.packing, plain.group_by_length) == ("padded", False, False)


def test_sft_kwargs_cpu() -> None:
    s = spec(
        training={
            "maxSteps": 20,
            "learningRate": 0.005,
            "warmupRatio": 0.1,
            "batchSize": 2,
            "gradientAccumulationSteps": 3,
            "saveSteps": 10,
            "evalSteps": 5,
            "scheduler": "linear",
        }
    )
    kw = mapping.sft_kwargs(s, output_dir="/o", device=CPU, data_format="messages", has_eval=True, train_rows=100)
    assert kw["max_steps"] == 20 and kw["learning_rate"] == 0.005 and kw["lr_scheduler_type"] == "linear"
    assert kw["warmup_steps"] == 0.1  # a float < 1 is a ratio in transformers 5
    assert kw["per_device_train_batch_size"] == 2 and kw["gradient_accumulation_steps"] == 3
    assert kw["use_cpu"] is True and kw["bf16"] is False and kw["fp16"] is False
    assert kw["activation_checkpointing"] is False
    assert kw["assistant_only_loss"] is True
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == 5
    assert kw["load_best_model_at_end"] is True and kw["metric_for_best_model"] == "eval_loss"
    assert kw["train_sampling_strategy"] == "group_by_length"
    assert kw["optim"] == "adamw_torch_fused"
    assert kw["logging_steps"] == 1 and kw["report_to"] == "none"
    assert "max_seq_length" not in kw and "warmup_ratio" not in kw and "gradient_checkpointing" not in kw


def test_sft_kwargs_gpu_and_edge_cases() -> None:
    s = spec(method="qlora", training={"epochs": 2, "saveSteps": 50, "evalSteps": 20})
    kw = mapping.sft_kwargs(
        s, output_dir="/o", device=GPU, data_format="prompt-completion", has_eval=True, train_rows=1000
    )
    assert kw["max_steps"] == -1 and kw["num_train_epochs"] == 2
    assert kw["bf16"] is True and kw["use_cpu"] is False
    assert kw["packing"] is True and kw["max_length"] == 2048
    assert kw["activation_checkpointing"] is True
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert kw["optim"] == "paged_adamw_32bit"
    assert kw["assistant_only_loss"] is False
    assert "load_best_model_at_end" not in kw  # 50 is not a multiple of 20: the best step may not be saved
    no_eval = mapping.sft_kwargs(
        spec(training={"warmupRatio": 0}),
        output_dir="/o",
        device=GPU,
        data_format="text",
        has_eval=False,
        train_rows=10,
    )
    assert no_eval["eval_strategy"] == "no" and no_eval["warmup_steps"] == 0
    assert "load_best_model_at_end" not in no_eval


def test_total_steps_and_logging_interval() -> None:
    assert mapping.estimate_total_steps(100, TrainingSpec(batch_size=4, gradient_accumulation_steps=4, epochs=3)) == 21
    assert mapping.estimate_total_steps(100, TrainingSpec(max_steps=7)) == 7
    assert mapping.logging_steps_for(20) == 1
    assert mapping.logging_steps_for(10_000) == 50


def test_plan_notes_explain_cpu_choices() -> None:
    notes = mapping.plan_notes(spec(method="qlora"), CPU)
    text = "\n".join(notes)
    assert "device cpu" in text and "batching grouped" in text
    assert "CPU is slow" in text or "on CPU is slow" in text
    assert "adamw_torch_fused" in text
