"""The run: pre-flight, load, train (resuming), publish. Each step is delegated to its module.

Order matters for cost: everything that can reject the job (dataset rows, token lengths, the base
model's tokenizer) runs before any weights are loaded, so a bad LoRAJob fails in seconds, not after a
multi-GB download.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelora.api.reasons import Reason
from kubelora.api.runtime import TrainerResult, TrainerRunConfig, ValidationStats
from kubelora_trainer import mapping
from kubelora_trainer.checkpoints import RemoteCheckpoints, find_resume_checkpoint
from kubelora_trainer.data import DatasetSplits, Record, load_splits
from kubelora_trainer.errors import TrainingFailedError, TrainingStoppedError
from kubelora_trainer.modelload import ModelRef, detect_device, load_base_model, load_tokenizer, resolve_base_model
from kubelora_trainer.progress import ProgressSink, ProgressTracker, default_sinks, make_callback
from kubelora_trainer.publish import existing_adapter, publish_adapter, revision_dir
from kubelora_trainer.stopping import GracefulStop
from kubelora_trainer.storage import locate
from kubelora_trainer.validate import LossPlan, plan_loss, validate_splits

log = logging.getLogger(__name__)

WORK_DIR_ENV = "KUBELORA_WORK_DIR"
DEFAULT_WORK_DIR = "/tmp/kubelora/work"


@dataclass
class Preflight:
    """What pre-flight learned; training continues from here."""

    splits: DatasetSplits
    stats: ValidationStats
    tokenizer: Any
    model_ref: ModelRef
    loss: LossPlan


@dataclass
class Hooks:
    """Test/benchmark hooks into a run (all optional)."""

    sinks: list[ProgressSink] | None = None
    """Progress sinks; default: the LoRAJob status in a cluster, nothing outside one."""
    progress_interval: float | None = None
    on_trainer: Callable[[Any], None] | None = None
    """Called with the SFTTrainer right before ``train()`` (inspect the model, add callbacks)."""
    extra_callbacks: list[Any] = field(default_factory=list)


def preflight(run: TrainerRunConfig, tokenizer_only: bool = True) -> Preflight:
    """Dataset checks, base model lookup, tokenizer, loss plan and token lengths (raises TrainerError)."""
    spec = run.spec
    t0 = time.monotonic()
    splits = load_splits(spec.dataset, spec.training.seed)
    log.info("dataset %s: %d train / %d eval rows, format %s", spec.dataset.uri, len(splits.train),
             len(splits.eval), splits.format)
    ref = resolve_base_model(spec.base_model.uri, tokenizer_only=tokenizer_only)
    tokenizer = load_tokenizer(ref)
    loss = plan_loss(tokenizer, splits.format)
    if loss.convert_to_prompt_completion:
        log.warning(loss.note)
    else:
        log.info(loss.note)
    stats, splits = validate_splits(tokenizer, splits, spec.training.max_seq_length, loss)
    log.info("pre-flight passed in %.1fs: %s", time.monotonic() - t0, stats.model_dump_json(by_alias=True))
    return Preflight(splits, stats, tokenizer, ref, loss)


def validate_only(run: TrainerRunConfig) -> TrainerResult:
    pre = preflight(run, tokenizer_only=True)
    s = pre.stats
    return TrainerResult(ok=True, reason=Reason.VALIDATION_PASSED.value,
                         message=f"{s.train_rows} train / {s.eval_rows} eval rows ({s.format}), longest "
                                 f"{s.max_tokens} tokens of {run.spec.training.max_seq_length}",
                         validation=s)


def to_dataset(records: list[Record]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([r.row for r in records])


def build_trainer(run: TrainerRunConfig, *, model: Any, tokenizer: Any, splits: DatasetSplits, loss: LossPlan,
                  device: mapping.Device, output_dir: str, callbacks: list[Any] | None = None) -> Any:
    """The SFTTrainer this trainer uses (also what the throughput benchmark measures)."""
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    # peft/trl still read the pre-v5 name; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    has_eval = bool(splits.eval)
    kwargs = mapping.sft_kwargs(run.spec, output_dir=output_dir, device=device, data_format=splits.format,
                                has_eval=has_eval, train_rows=len(splits.train),
                                assistant_only_loss=loss.assistant_only_loss)
    args = SFTConfig(**kwargs)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(splits.train),
        eval_dataset=to_dataset(splits.eval) if has_eval else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(**mapping.lora_kwargs(run.spec.lora)),
        callbacks=callbacks or [],
    )
    # stdout carries only the result JSON; the progress callback logs a readable line per logging step.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _checkpoint_dirs(run: TrainerRunConfig) -> tuple[Path, RemoteCheckpoints | None, str]:
    """Local checkpoint folder (on the volume itself for pvc/file; a work dir mirrored to s3 otherwise)."""
    rev_uri = revision_dir(run.spec.output.uri, run.revision)
    loc = locate(rev_uri)
    if loc.is_local:
        return Path(loc.path) / "checkpoints", None, f"{rev_uri}/checkpoints"
    work = Path(os.environ.get(WORK_DIR_ENV, DEFAULT_WORK_DIR)) / f"{run.namespace}-{run.name}-rev-{run.revision}"
    local = work / "checkpoints"
    local.mkdir(parents=True, exist_ok=True)
    return local, RemoteCheckpoints(loc, "checkpoints", local), f"{rev_uri}/checkpoints"


def count_4bit_linear(model: Any) -> int:
    """How many bitsandbytes Linear4bit layers a model holds (the frozen base of a QLoRA run)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return len([m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)])  # type: ignore[attr-defined]


def train(run: TrainerRunConfig, hooks: Hooks | None = None) -> TrainerResult:
    """Train (or resume) and publish; returns the TrainerResult. Raises TrainerError on known failures."""
    hooks = hooks or Hooks()
    spec = run.spec
    done = existing_adapter(run)
    if done is not None:
        manifest, info = done
        log.info("revision %d is already published and verifies (%s): nothing to do", run.revision, info.digest)
        return TrainerResult(ok=True, reason=Reason.COMPLETED.value, message="adapter already published",
                             adapter=info, metrics=manifest.metrics)

    pre = preflight(run, tokenizer_only=True)  # reject bad input before downloading any weights
    model_ref = resolve_base_model(spec.base_model.uri, tokenizer_only=False)
    device = detect_device()
    for note in mapping.plan_notes(spec, device):
        (log.warning if "slow" in note else log.info)(note)
    precision = mapping.plan_precision(spec.method, spec.effective_quantization, device)
    bnb = (mapping.bnb_kwargs(spec.effective_quantization, precision)
           if spec.method == "qlora" and spec.effective_quantization else None)

    t_load = time.monotonic()
    model = load_base_model(model_ref, spec.method, precision, device, bnb)
    n4 = count_4bit_linear(model)
    log.info("base model loaded in %.1fs%s", time.monotonic() - t_load,
             f" ({n4} Linear4bit layers)" if spec.method == "qlora" else "")
    vocab_before = len(pre.tokenizer)

    local_ckpts, remote, ckpt_uri = _checkpoint_dirs(run)
    local_ckpts.mkdir(parents=True, exist_ok=True)
    resume = find_resume_checkpoint(local_ckpts)
    if resume is None and remote is not None:
        pulled = remote.pull_newest()
        resume = find_resume_checkpoint(local_ckpts) if pulled else None

    sinks = hooks.sinks if hooks.sinks is not None else default_sinks(run.name, run.namespace)
    tracker = ProgressTracker(sinks, hooks.progress_interval, checkpoint_uri=lambda n: f"{ckpt_uri}/{n}")
    on_save = (lambda path: remote.push(Path(path))) if remote is not None else None
    stop = GracefulStop()
    trainer = build_trainer(run, model=model, tokenizer=pre.tokenizer, splits=pre.splits, loss=pre.loss,
                            device=device, output_dir=str(local_ckpts),
                            callbacks=[make_callback(tracker, on_save), stop.callback(), *hooks.extra_callbacks])
    if hooks.on_trainer is not None:
        hooks.on_trainer(trainer)

    if resume is not None:
        log.info("resuming from %s at step %d", resume.path, resume.step)
    try:
        return _train_and_publish(run, trainer, tracker, stop, resume, pre, vocab_before, n4)
    finally:
        tracker.close()


def _train_and_publish(run: TrainerRunConfig, trainer: Any, tracker: ProgressTracker, stop: GracefulStop,
                       resume: Any, pre: Any, vocab_before: int, n4: int) -> TrainerResult:
    spec = run.spec
    t_train = time.monotonic()
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            raise TrainingFailedError(
                f"out of memory at step {trainer.state.global_step}: {str(exc).splitlines()[0][:200]}. Fix: lower "
                "training.batchSize (raise gradientAccumulationSteps to keep the effective batch), lower "
                "maxSeqLength, use method qlora, or request a larger GPU") from exc
        raise
    finally:
        stop.uninstall()
        tracker.finish()
    train_seconds = time.monotonic() - t_train
    if stop.requested:
        raise TrainingStoppedError(
            f"stopped by {stop.signal_name} at step {trainer.state.global_step} after saving "
            f"checkpoint-{trainer.state.global_step}; a restarted pod resumes from it")

    metrics = _metrics(trainer, output, train_seconds, resume.step if resume else 0)
    if spec.method == "qlora":
        metrics["base_linear4bit_layers"] = float(n4)
    if pre.splits.eval:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    changed_tokenizer = len(pre.tokenizer) != vocab_before
    _, info = publish_adapter(trainer.model, pre.tokenizer, run, metrics, save_tokenizer=changed_tokenizer)
    tracker.published(info)
    return TrainerResult(ok=True, reason=Reason.COMPLETED.value,
                         message=f"trained {int(metrics.get('global_step', 0))} steps; adapter {info.uri}",
                         adapter=info, metrics=metrics, validation=pre.stats)


def _metrics(trainer: Any, output: Any, train_seconds: float, resumed_from: int) -> dict[str, float]:
    """Numbers worth keeping in the manifest and the result (first/last loss show the run learned)."""
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    metrics: dict[str, float] = {
        "global_step": float(state.global_step),
        "epoch": float(state.epoch or 0.0),
        "train_seconds": round(train_seconds, 3),
        "resumed_from_step": float(resumed_from),
    }
    if output is not None and "train_loss" in output.metrics:
        metrics["train_loss"] = float(output.metrics["train_loss"])
    if losses:
        metrics["first_loss"] = float(losses[0])
        metrics["final_loss"] = float(losses[-1])
    if evals:
        metrics["best_eval_loss"] = float(min(evals))
    tokens = getattr(trainer, "_total_train_tokens", None)
    if tokens and train_seconds > 0:
        metrics["train_tokens"] = float(tokens)
        metrics["tokens_per_second"] = round(float(tokens) / train_seconds, 1)
    return metrics
