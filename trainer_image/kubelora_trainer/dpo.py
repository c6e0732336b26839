"""``objective: dpo``: TRL's DPOTrainer with LoRA, for alignment from preference pairs.

The reference policy is the base model itself: with a peft model and ``ref_model=None`` TRL computes the
reference log-probabilities with the adapter disabled, so no second copy of the weights is loaded. The
hyperparameters shared with SFT (learning rate, batch, schedule, checkpoints, precision, distribution) come
from the same mapping; DPO adds ``beta`` and ``loss_type`` (``spec.dpo``). TRL logs ``rewards/margins``
(chosen minus rejected implicit reward) and ``rewards/accuracies`` (how often chosen wins); they go into
``status.progress`` and, first and last values, into the adapter's metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from kubelora.api.runtime import TrainerRunConfig
from kubelora_trainer import distributed as dist
from kubelora_trainer import mapping
from kubelora_trainer.data import DatasetSplits, Record

log = logging.getLogger(__name__)

LOGGED = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
          "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}
"""TRL's log keys -> the names in the adapter's metrics (eval_ prefixed ones as eval_<name>)."""
NOT_FOR_DPO = ("packing", "padding_free", "assistant_only_loss", "train_sampling_strategy")
"""SFT batching choices that do not carry over: DPO pads chosen/rejected pairs itself."""


def dpo_kwargs(run: TrainerRunConfig, *, output_dir: str, device: mapping.Device, has_eval: bool, train_rows: int,
               world_size: int = 1, fits_one_gpu: bool = True) -> dict[str, Any]:
    """trl.DPOConfig arguments: the SFT mapping minus SFT-only fields, plus beta, loss type and max length."""
    from trl import DPOConfig  # type: ignore[attr-defined]

    spec = run.spec
    kwargs = mapping.sft_kwargs(spec, output_dir=output_dir, device=device, data_format="preference",
                                has_eval=has_eval, train_rows=train_rows, world_size=world_size,
                                fits_one_gpu=fits_one_gpu)
    accepted = {f.name for f in dataclasses.fields(DPOConfig)}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and k not in NOT_FOR_DPO}
    kwargs.update(beta=spec.dpo.beta, loss_type=spec.dpo.loss_type, max_length=spec.training.max_seq_length,
                  train_sampling_strategy="random")
    return {k: v for k, v in kwargs.items() if k in accepted}


def to_dataset(records: list[Record]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([r.row for r in records])


def build_dpo_trainer(run: TrainerRunConfig, *, model: Any, tokenizer: Any, splits: DatasetSplits,
                      device: mapping.Device, output_dir: str, callbacks: list[Any] | None = None,
                      world_size: int = 1, fits_one_gpu: bool = True) -> Any:
    """The DPOTrainer of a dpo run: LoRA on the base, the base (adapter disabled) as the reference."""
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    has_eval = bool(splits.eval)
    kwargs = dpo_kwargs(run, output_dir=output_dir, device=device, has_eval=has_eval, train_rows=len(splits.train),
                        world_size=world_size, fits_one_gpu=fits_one_gpu)
    if kwargs.get("fsdp") and device.is_cpu:
        dist.enable_cpu_fsdp()
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # with a peft model: the base with the adapter disabled, no second copy
        args=DPOConfig(**kwargs),
        train_dataset=to_dataset(splits.train),
        eval_dataset=to_dataset(splits.eval) if has_eval else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(**mapping.lora_kwargs(run.spec.lora)),
        callbacks=callbacks or [],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """First and last logged reward margin/accuracy (train), last eval ones: the run moved the margin or not."""
    out: dict[str, float] = {}
    for key, name in LOGGED.items():
        train = [float(h[key]) for h in log_history if key in h]
        if train:
            out[name] = train[-1]
            if name in ("reward_margin", "reward_accuracy"):
                out[f"first_{name}"] = train[0]
        evals = [float(h[f"eval_{key}"]) for h in log_history if f"eval_{key}" in h]
        if evals:
            out[f"eval_{name}"] = evals[-1]
    return out
