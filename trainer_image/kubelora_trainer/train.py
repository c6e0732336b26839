"""The run: pre-flight, load, train (resuming), publish. Each step is delegated to its module.

Order matters for cost: everything that can reject the job (dataset rows, token lengths, the base
model's tokenizer) runs before any weights are loaded, so a bad LoRAJob fails in seconds, not after a
multi-GB download.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelora.api.evaluation import EvaluationResult, metrics_of
from kubelora.api.reasons import Reason
from kubelora.api.runtime import TrainerResult, TrainerRunConfig, ValidationStats
from kubelora_trainer import distributed as dist
from kubelora_trainer import mapping, memory
from kubelora_trainer.checkpoints import RemoteCheckpoints, checkpoints_rel, checkpoints_uri, find_resume_checkpoint
from kubelora_trainer.data import DatasetSplits, Record, load_splits
from kubelora_trainer.errors import InvalidSpecError, TrainingFailedError, TrainingStoppedError
from kubelora_trainer.merge import ensure_merged
from kubelora_trainer.modelload import ModelRef, detect_device, load_base_model, load_tokenizer, resolve_base_model
from kubelora_trainer.preference import LOSS_PLAN as PREFERENCE_LOSS
from kubelora_trainer.preference import load_preference_splits, validate_preference_splits
from kubelora_trainer.progress import ProgressSink, ProgressTracker, default_sinks, make_callback
from kubelora_trainer.publish import existing_adapter, publish_adapter
from kubelora_trainer.stopping import GracefulStop
from kubelora_trainer.storage import locate
from kubelora_trainer.validate import LossPlan, plan_loss, validate_splits

log = logging.getLogger(__name__)

WORK_DIR_ENV = "KUBELORA_WORK_DIR"


@dataclass
class Preflight:
    """What pre-flight learned; training continues from here."""

    splits: DatasetSplits
    stats: ValidationStats
    tokenizer: Any
    model_ref: ModelRef
    loss: LossPlan
    references: list[Any] = field(default_factory=list)
    """spec.evaluation's reference answers (inline and referencesUri), read and checked before training."""


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
    dpo = spec.objective == "dpo"
    splits = (load_preference_splits if dpo else load_splits)(spec.training_dataset, spec.training.seed)
    log.info("dataset %s: %d train / %d eval rows, format %s", spec.dataset.uri, len(splits.train),
             len(splits.eval), splits.format)
    ref = resolve_base_model(spec.base_model.uri, tokenizer_only=tokenizer_only)
    tokenizer = load_tokenizer(ref)
    loss = PREFERENCE_LOSS if dpo else plan_loss(tokenizer, splits.format)
    if loss.convert_to_prompt_completion:
        log.warning(loss.note)
    else:
        log.info(loss.note)
    stats, splits = (validate_preference_splits(tokenizer, splits, spec.training.max_seq_length) if dpo
                     else validate_splits(tokenizer, splits, spec.training.max_seq_length, loss))
    gpu_memory = memory.quantity_bytes(spec.resources.gpu_memory) if spec.resources.gpu_memory else None
    check_memory(run, ref, gpu_memory)
    from kubelora_trainer.evaluate import load_references

    references = load_references(spec.evaluation)
    from kubelora_trainer.preflight_checks import rendered_rows

    stats = stats.model_copy(update={"rendered": rendered_rows(tokenizer, splits.train, loss)})
    log.info("pre-flight passed in %.1fs: %s", time.monotonic() - t0, stats.model_dump_json(by_alias=True))
    return Preflight(splits, stats, tokenizer, ref, loss, references)


def model_shape(ref: ModelRef) -> memory.ModelShape | None:
    """The base model's shape from its config.json (None when it is not a plain decoder the estimate knows)."""
    import json

    try:
        path = Path(ref.name_or_path) / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(ref.name_or_path, **ref.pretrained_kwargs()).to_dict()
        return memory.ModelShape.from_config(cfg.get("text_config", cfg))
    except Exception as exc:  # an estimate is advice: never fail a run because it cannot be made
        log.info("no memory estimate for %s (%s: %s)", ref.uri, type(exc).__name__, str(exc)[:200])
        return None


def check_memory(run: TrainerRunConfig, ref: ModelRef, gpu_bytes: int | None) -> bool:
    """Refuse a plan whose memory per GPU cannot fit ``gpu_bytes``, naming the smallest plan that would.

    Returns whether the model trains with DDP (a whole replica per GPU): what ``strategy: auto`` decides
    on; with several processes auto falls back to FSDP when DDP does not fit but FSDP does.
    """
    spec = run.spec
    if spec.resources.gpus == 0 or gpu_bytes is None:
        return True
    shape = model_shape(ref)
    if shape is None:
        return True
    world = spec.world_size
    wanted = mapping.plan_strategy(spec, world)
    plan = memory.plan_from_spec(spec, world, "fsdp" if wanted == "fsdp" else "ddp")
    problem = memory.check(shape, plan, gpu_bytes)
    if problem is None:
        log.info("memory estimate: %s", memory.estimate(shape, plan).describe())
        return True
    if spec.distributed.strategy == "auto" and world > 1:
        sharded = memory.plan_from_spec(spec, world, "fsdp")
        if memory.check(shape, sharded, gpu_bytes) is None:
            log.info("strategy auto: a replica does not fit one GPU, sharding with FSDP (%s)",
                     memory.estimate(shape, sharded).describe())
            return False
    raise InvalidSpecError(f"{problem}. Fix: change spec.method, spec.training or spec.resources accordingly")


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
                  device: mapping.Device, output_dir: str, callbacks: list[Any] | None = None,
                  world_size: int = 1, fits_one_gpu: bool = True) -> Any:
    """The SFTTrainer this trainer uses (also what the throughput benchmark measures); DPOTrainer for dpo."""
    if run.spec.objective == "dpo":
        from kubelora_trainer.dpo import build_dpo_trainer

        return build_dpo_trainer(run, model=model, tokenizer=tokenizer, splits=splits, device=device,
                                 output_dir=output_dir, callbacks=callbacks, world_size=world_size,
                                 fits_one_gpu=fits_one_gpu)
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    # peft/trl still read the pre-v5 name; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    has_eval = bool(splits.eval)
    kwargs = mapping.sft_kwargs(run.spec, output_dir=output_dir, device=device, data_format=splits.format,
                                has_eval=has_eval, train_rows=len(splits.train),
                                assistant_only_loss=loss.assistant_only_loss, world_size=world_size,
                                fits_one_gpu=fits_one_gpu)
    if kwargs.get("fsdp") and device.is_cpu:
        dist.enable_cpu_fsdp()
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
    """Local checkpoint folder (on the volume itself for pvc/file; a work dir mirrored to s3 otherwise), the
    mirror, and the folder's URI: ``<output>/checkpoints/rev-<revision>``, outside the published adapter."""
    ckpt_uri = checkpoints_uri(run.spec.output.uri, run.revision)
    loc = locate(ckpt_uri)
    if loc.is_local:
        return Path(loc.path), None, ckpt_uri
    # The temp dir, not /tmp: pods run with a read-only root filesystem and TMPDIR on a scratch volume.
    work_root = Path(os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir(), "kubelora", "work"))
    work = work_root / f"{run.namespace}-{run.name}-rev-{run.revision}"
    local = work / "checkpoints"
    local.mkdir(parents=True, exist_ok=True)
    return local, RemoteCheckpoints(locate(run.spec.output.uri), checkpoints_rel(run.revision), local), ckpt_uri


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
    rank = dist.current_rank()
    device = detect_device()
    dist.init(rank, cuda=not device.is_cpu)
    # Every rank takes rank 0's view of the shared output, so all of them take the same branch.
    done = dist.broadcast(existing_adapter(run) if rank.is_main else None, rank)
    if done is not None:
        manifest, info = done
        log.info("revision %d is already published and verifies (%s): nothing to do", run.revision, info.digest)
        merged = dist.broadcast(ensure_merged(run, info) if rank.is_main else None, rank)
        return TrainerResult(ok=True, reason=Reason.COMPLETED.value, message="adapter already published",
                             adapter=info, merged=merged, metrics=manifest.metrics)

    pre = preflight(run, tokenizer_only=True)  # reject bad input before downloading any weights
    model_ref = resolve_base_model(spec.base_model.uri, tokenizer_only=False)
    fits_one_gpu = check_memory(run, model_ref, _gpu_bytes(device, rank, spec.resources.gpu_memory))
    strategy = mapping.plan_strategy(spec, rank.world_size, fits_one_gpu)
    if rank.is_main:
        for note in mapping.plan_notes(spec, device, world_size=rank.world_size):
            (log.warning if "slow" in note else log.info)(note)
    precision = mapping.plan_precision(spec.method, spec.effective_quantization, device)
    bnb = (mapping.bnb_kwargs(spec.effective_quantization, precision, fsdp=strategy == "fsdp")
           if spec.method == "qlora" and spec.effective_quantization else None)

    t_load = time.monotonic()
    model = load_base_model(model_ref, spec.method, precision, device, bnb, local_rank=rank.local_rank,
                            sharded=strategy == "fsdp")
    n4 = count_4bit_linear(model)
    log.info("base model loaded in %.1fs%s", time.monotonic() - t_load,
             f" ({n4} Linear4bit layers)" if spec.method == "qlora" else "")
    if spec.preflight.overfit_batch is not None:
        model = _overfit_check(run, model, pre, strategy)
    vocab_before = len(pre.tokenizer)

    local_ckpts, remote, ckpt_uri = _checkpoint_dirs(run)
    local_ckpts.mkdir(parents=True, exist_ok=True)
    resume = _resume_point(local_ckpts, remote, rank)

    # Only rank 0 reports: one status writer, one log line per step, one uploader of checkpoints.
    sinks: list[ProgressSink] = []
    if rank.is_main:
        sinks = hooks.sinks if hooks.sinks is not None else default_sinks(run.name, run.namespace)
    tracker = ProgressTracker(sinks, hooks.progress_interval, checkpoint_uri=lambda n: f"{ckpt_uri}/{n}",
                              quiet=not rank.is_main)
    on_save = (lambda path: remote.push(Path(path))) if remote is not None and rank.is_main else None
    stop = GracefulStop()
    trainer = build_trainer(run, model=model, tokenizer=pre.tokenizer, splits=pre.splits, loss=pre.loss,
                            device=device, output_dir=str(local_ckpts), world_size=rank.world_size,
                            fits_one_gpu=fits_one_gpu,
                            callbacks=[make_callback(tracker, on_save), stop.callback(rank),
                                       _watch(run, pre, tracker), *hooks.extra_callbacks])
    if hooks.on_trainer is not None:
        hooks.on_trainer(trainer)

    if resume is not None:
        log.info("resuming from %s at step %d", resume.path, resume.step)
    try:
        return _train_and_publish(run, trainer, tracker, stop, resume, pre, vocab_before, n4, rank, strategy)
    finally:
        tracker.close()


def _gpu_bytes(device: mapping.Device, rank: dist.Rank, declared: str | None) -> int | None:
    """The memory of this process's GPU as CUDA reports it (the spec's gpuMemory without a GPU)."""
    if not device.is_cpu:
        import torch

        return int(torch.cuda.get_device_properties(rank.local_rank).total_memory)
    return memory.quantity_bytes(declared) if declared else None


def _resume_point(local: Path, remote: RemoteCheckpoints | None, rank: dist.Rank) -> Any:
    """The checkpoint every rank resumes from: rank 0 picks it (and drops incomplete ones), the others follow.

    With s3 outputs each node trains from a local copy: the first process of a node that lacks the chosen
    checkpoint downloads it before anyone loads it.
    """
    resume = None
    if rank.is_main:
        resume = find_resume_checkpoint(local)
        if resume is None and remote is not None:
            pulled = remote.pull_newest()
            resume = find_resume_checkpoint(local) if pulled else None
    resume = dist.broadcast(resume, rank)
    if resume is not None and remote is not None and not rank.is_main and rank.local_rank == 0 \
            and not resume.path.is_dir():
        remote.pull_step(resume.step)
    dist.barrier(rank)
    return resume


def _train_and_publish(run: TrainerRunConfig, trainer: Any, tracker: ProgressTracker, stop: GracefulStop,
                       resume: Any, pre: Any, vocab_before: int, n4: int, rank: dist.Rank | None = None,
                       strategy: str = "ddp") -> TrainerResult:
    rank = rank or dist.Rank()
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
    if spec.objective == "dpo":
        from kubelora_trainer.dpo import run_metrics

        metrics.update(run_metrics(trainer.state.log_history))
    if spec.method == "qlora":
        metrics["base_linear4bit_layers"] = float(n4)
    evaluation = _evaluate(run, trainer, pre)
    metrics.update(metrics_of(evaluation))
    changed_tokenizer = len(pre.tokenizer) != vocab_before
    # FSDP: every rank takes part in gathering the full adapter; rank 0 alone writes the standard peft files.
    state_dict = dist.full_state_dict(trainer.model) if strategy == "fsdp" and rank.distributed else None
    info = None
    if rank.is_main:
        _, info = publish_adapter(trainer.model, pre.tokenizer, run, metrics, save_tokenizer=changed_tokenizer,
                                  state_dict=state_dict, loaded_from=pre.model_ref.name_or_path,
                                  dataset_digest=pre.splits.digest)
        tracker.published(info)
    info = dist.broadcast(info, rank)
    merged = dist.broadcast(ensure_merged(run, info) if rank.is_main else None, rank)
    return TrainerResult(ok=True, reason=Reason.COMPLETED.value,
                         message=f"trained {int(metrics.get('global_step', 0))} steps; adapter {info.uri}",
                         adapter=info, merged=merged, metrics=metrics, validation=pre.stats,
                         evaluation=evaluation)


def _evaluate(run: TrainerRunConfig, trainer: Any, pre: Preflight) -> EvaluationResult:
    """Adapter vs base on the held-out set and the references (:mod:`kubelora_trainer.evaluate`)."""
    from kubelora_trainer.evaluate import evaluate
    from kubelora_trainer.watch import stopped_early

    return evaluate(trainer, pre.tokenizer, run.spec.evaluation, pre.splits.eval, pre.references,
                    stopped_early=stopped_early(trainer))


def _overfit_check(run: TrainerRunConfig, model: Any, pre: Preflight, strategy: str) -> Any:
    """preflight.overfitBatch before the long run (:mod:`kubelora_trainer.preflight_checks`); raises on a miss."""
    from kubelora_trainer.preflight_checks import OverfitCheckFailedError, overfit_batch

    cfg = run.spec.preflight.overfit_batch
    assert cfg is not None
    if strategy == "fsdp":
        log.warning("preflight.overfitBatch is skipped with FSDP: the smoke run needs the whole model in one process")
        return model
    model, result = overfit_batch(model, pre.tokenizer, pre.splits.train, pre.loss, cfg,
                                  mapping.lora_kwargs(run.spec.lora),
                                  cfg.learning_rate or run.spec.training.learning_rate)
    pre.stats = pre.stats.model_copy(update={"overfit": result})
    if not result.passed:
        raise OverfitCheckFailedError(f"preflight.overfitBatch failed: {result.message}")
    return model


def _watch(run: TrainerRunConfig, pre: Preflight, tracker: ProgressTracker) -> Any:
    """Early stopping and the loss-spike warning (:mod:`kubelora_trainer.watch`)."""
    from kubelora_trainer.watch import make_watch_callback

    return make_watch_callback(run.spec.evaluation, bool(pre.splits.eval), tracker.loss_spiked)


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
