"""Pure translation of a LoRAJob spec into peft / bitsandbytes / TRL keyword arguments.

Every decision that depends on the hardware (precision, optimizer, batching strategy) is made here from a
small :class:`Device` description, as plain data, so unit tests can check the mapping for a GPU without
having one, and so the trainer's logs can say exactly what was chosen and why. No torch import here.

The TRL 1.16 / transformers 5 names used below (verified): ``max_length`` (not max_seq_length),
``warmup_steps`` as a float ratio (``warmup_ratio`` was removed), ``activation_checkpointing`` (the
``gradient_checkpointing`` alias warns), ``use_cpu`` (not no_cuda), ``eval_strategy``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kubelora.api.lorajob import LoRAJobSpec, LoraSpec, QuantizationSpec, TrainingSpec

CPU_BATCHING_ENV = "KUBELORA_CPU_BATCHING"
"""Override of the CPU batching strategy ("grouped", "padding_free" or "padded"); for benchmarks."""
SAVE_TOTAL_LIMIT = 3
"""Checkpoints kept per revision (the best one is kept in addition when evaluation picks a best model)."""

BatchingName = Literal["packing", "padding_free", "grouped", "padded"]


@dataclass(frozen=True)
class Device:
    """What the trainer runs on, as far as the mapping cares."""

    kind: Literal["cuda", "cpu"]
    bf16: bool = False
    """Native bfloat16 math (Ampere+ GPUs; CPUs with AVX512-BF16/AMX)."""
    flash_attention: bool = False
    """The flash_attn package imports (GPU only)."""

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


@dataclass(frozen=True)
class Precision:
    """Dtypes for loading and training, and why."""

    model_dtype: str
    """dtype of the (non-quantized) base weights: bfloat16, float16 or float32."""
    bf16: bool
    """Mixed precision flags for SFTConfig."""
    fp16: bool
    compute_dtype: str | None = None
    """bitsandbytes 4-bit compute dtype (qlora only)."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Batching:
    """How samples become batches."""

    name: BatchingName
    packing: bool = False
    padding_free: bool = False
    group_by_length: bool = False
    max_length: int | None = None
    notes: tuple[str, ...] = field(default=())


def plan_precision(method: str, quant: QuantizationSpec | None, device: Device) -> Precision:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (CPU bf16 without native support is slow)."""
    if method == "qlora":
        quant = quant or QuantizationSpec()
        compute = quant.compute_dtype
        notes: list[str] = []
        if device.is_cpu:
            if compute != "float32" and not (compute == "bfloat16" and device.bf16):
                notes.append(f"4-bit compute dtype {compute} -> float32: this CPU has no native {compute} math")
                compute = "float32"
            return Precision(model_dtype="float32", bf16=False, fp16=False, compute_dtype=compute,
                             notes=tuple(notes))
        if compute == "bfloat16" and not device.bf16:
            notes.append("4-bit compute dtype bfloat16 -> float16: this GPU has no bfloat16 support")
            compute = "float16"
        return Precision(model_dtype=compute, bf16=compute == "bfloat16", fp16=compute == "float16",
                         compute_dtype=compute, notes=tuple(notes))
    if device.is_cpu:
        return Precision(model_dtype="float32", bf16=False, fp16=False)
    if device.bf16:
        return Precision(model_dtype="bfloat16", bf16=True, fp16=False)
    return Precision(model_dtype="float16", bf16=False, fp16=True,
                     notes=("this GPU has no bfloat16 support: training in float16 mixed precision",))


def plan_optimizer(name: str, device: Device) -> tuple[str, str | None]:
    """The optimizer to pass to TRL, plus a note when it differs from the spec.

    Paging only moves optimizer state between GPU and host memory; on a CPU there is nothing to page, and
    bitsandbytes' CPU fallback of paged_adamw_32bit measured ~25% slower per step than torch's fused AdamW,
    which is the same update rule in 32 bits. 8-bit optimizers keep their (different) numerics.
    """
    if device.is_cpu and name == "paged_adamw_32bit":
        return "adamw_torch_fused", "optimizer paged_adamw_32bit -> adamw_torch_fused (same AdamW; paging is GPU-only)"
    if device.is_cpu and name == "paged_adamw_8bit":
        return "adamw_8bit", "optimizer paged_adamw_8bit -> adamw_8bit (paging is GPU-only)"
    return name, None


def plan_batching(training: TrainingSpec, device: Device) -> Batching:
    """Packing on GPU; on CPU, the strategy that measured fastest on mixed-length data (bench/RESULTS.md).

    On CPU the cost is compute spent on pad tokens: length-grouped padded batches avoid almost all of it
    while keeping attention per sample (packing and padding-free rows pay attention over the whole
    concatenated row, which made packing 0.5x on CPU). ``spec.training.packing: false`` keeps plain padded
    batches in random order, as the user asked.
    """
    if not training.packing:
        return Batching(name="padded", max_length=training.max_seq_length)
    if not device.is_cpu:
        notes = () if device.flash_attention else (
            "packing with sdpa attention (flash_attn is not installed); packed rows stay separated by position_ids",)
        return Batching(name="packing", packing=True, padding_free=True, max_length=training.max_seq_length,
                        notes=notes)
    choice = os.environ.get(CPU_BATCHING_ENV, "grouped")
    if choice == "padding_free":
        # TRL refuses max_length with padding-free batches; pre-flight already rejects over-long samples.
        return Batching(name="padding_free", padding_free=True, max_length=None)
    if choice == "padded":
        return Batching(name="padded", max_length=training.max_seq_length)
    return Batching(name="grouped", group_by_length=True, max_length=training.max_seq_length,
                    notes=("CPU: padded batches of similar length instead of packing (faster on CPU)",))


def lora_kwargs(lora: LoraSpec) -> dict[str, Any]:
    """peft.LoraConfig arguments."""
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules_value,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def bnb_kwargs(quant: QuantizationSpec, precision: Precision, fsdp: bool = False) -> dict[str, Any]:
    """transformers.BitsAndBytesConfig arguments; dtypes are names (the caller maps them to torch).

    FSDP-QLoRA (peft/bitsandbytes recipe): FSDP flattens and shards parameters of one float dtype, so the
    packed 4-bit weights are stored in the compute dtype (``bnb_4bit_quant_storage``) instead of uint8.
    """
    compute = precision.compute_dtype or quant.compute_dtype
    out: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant.quant_type,
        "bnb_4bit_use_double_quant": quant.double_quant,
        "bnb_4bit_compute_dtype": compute,
    }
    if fsdp:
        out["bnb_4bit_quant_storage"] = compute
    return out


Strategy = Literal["single", "ddp", "fsdp"]


def plan_strategy(spec: LoRAJobSpec, world_size: int, fits_one_gpu: bool = True) -> Strategy:
    """single for one process; the spec's ddp or fsdp; auto: ddp when the model fits one GPU, else fsdp."""
    if world_size <= 1:
        return "single"
    chosen = spec.distributed.strategy
    if chosen == "auto":
        return "ddp" if fits_one_gpu else "fsdp"
    return "fsdp" if chosen == "fsdp" else "ddp"


def distributed_kwargs(strategy: Strategy, device: Device, checkpointing: bool) -> dict[str, Any]:
    """SFTConfig arguments for DDP or FSDP2 (gloo on CPU, NCCL on GPU)."""
    if strategy == "single":
        return {}
    out: dict[str, Any] = {"ddp_backend": "gloo" if device.is_cpu else "nccl"}
    if strategy == "ddp":
        # Every LoRA weight gets a gradient each step: skip DDP's per-step search for unused parameters.
        out["ddp_find_unused_parameters"] = False
        return out
    out["fsdp"] = "full_shard auto_wrap"
    out["fsdp_config"] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules (decoder layers)
        "reshard_after_forward": True,
        # Each rank writes its shard (torch.distributed.checkpoint): no full copy of the model in one place.
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        # Under FSDP, checkpointing is FSDP's to apply; the Trainer's own flag would wrap twice.
        "activation_checkpointing": checkpointing,
    }
    return out


def estimate_total_steps(train_rows: int, training: TrainingSpec, world_size: int = 1) -> int:
    """Optimizer steps of the run, before packing changes the row count (used for the logging interval).

    Each step consumes ``batch_size * gradient_accumulation_steps * world_size`` rows.
    """
    if training.max_steps:
        return int(training.max_steps)
    per_epoch = math.ceil(math.ceil(train_rows / (training.batch_size * world_size))
                          / training.gradient_accumulation_steps)
    return max(1, per_epoch) * int(training.epochs)


def logging_steps_for(total_steps: int) -> int:
    """Log every step for short runs and about 200 lines for long ones."""
    return max(1, total_steps // 200)


def sft_kwargs(spec: LoRAJobSpec, *, output_dir: str, device: Device, data_format: str, has_eval: bool,
               train_rows: int, assistant_only_loss: bool | None = None, world_size: int = 1,
               fits_one_gpu: bool = True) -> dict[str, Any]:
    """trl.SFTConfig arguments for ``spec`` on ``device``.

    ``assistant_only_loss`` defaults to True for the messages format (the loss covers assistant turns only);
    prompt-completion data gets completion-only loss from TRL's default, text data is trained on in full.
    """
    t = spec.training
    precision = plan_precision(spec.method, spec.effective_quantization, device)
    optim, _ = plan_optimizer(t.optimizer, device)
    batching = plan_batching(t, device)
    total = estimate_total_steps(train_rows, t, world_size)
    strategy = plan_strategy(spec, world_size, fits_one_gpu)
    # A CPU has no accelerator memory to save: activation checkpointing would only recompute the forward pass.
    checkpointing = t.gradient_checkpointing and not device.is_cpu
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.scheduler,
        "warmup_steps": float(t.warmup_ratio) if t.warmup_ratio > 0 else 0,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_length": batching.max_length,
        "packing": batching.packing,
        "padding_free": batching.padding_free,
        "train_sampling_strategy": "group_by_length" if batching.group_by_length else "random",
        "activation_checkpointing": checkpointing and strategy != "fsdp",
        "activation_checkpointing_kwargs": {"use_reentrant": False} if checkpointing and strategy != "fsdp" else None,
        "optim": optim,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": logging_steps_for(total),
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": t.eval_steps if has_eval else None,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": device.is_cpu,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "dataloader_num_workers": 0,
        "assistant_only_loss": (data_format == "messages") if assistant_only_loss is None else assistant_only_loss,
    }
    kwargs.update(distributed_kwargs(strategy, device, checkpointing))
    # The best checkpoint must be one that was evaluated: only possible when saves land on eval steps.
    if has_eval and t.save_steps % t.eval_steps == 0:
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return kwargs


def plan_notes(spec: LoRAJobSpec, device: Device, world_size: int = 1) -> list[str]:
    """Human lines explaining every hardware-dependent choice (logged at start-up)."""
    t = spec.training
    strategy = plan_strategy(spec, world_size)
    precision = plan_precision(spec.method, spec.effective_quantization, device)
    batching = plan_batching(t, device)
    _, opt_note = plan_optimizer(t.optimizer, device)
    notes = [f"device {device.kind}; method {spec.method}; weights {precision.model_dtype}"
             + (f"; 4-bit compute {precision.compute_dtype}" if precision.compute_dtype else "")
             + f"; batching {batching.name}"]
    notes += list(precision.notes) + list(batching.notes)
    if strategy != "single":
        notes.append(f"{world_size} processes ({spec.resources.nodes} node(s)), {strategy.upper()}, "
                     f"{'gloo' if device.is_cpu else 'NCCL'}; global batch {t.batch_size} x "
                     f"{t.gradient_accumulation_steps} x {world_size} = "
                     f"{t.batch_size * t.gradient_accumulation_steps * world_size} samples per step")
    if opt_note:
        notes.append(opt_note)
    if t.gradient_checkpointing and device.is_cpu:
        notes.append("activation checkpointing off on CPU (it saves accelerator memory only, at ~30% more compute)")
    if device.is_cpu:
        notes.append("training on CPU is slow: fine for tiny models and tests, use resources.gpus >= 1 for real work")
    return notes
