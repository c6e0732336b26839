"""LoRAJob: fine-tune a base model with QLoRA or LoRA and publish a verifiable adapter."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubelora.api.alignment import DPO_NEEDS_A_DATASET, DpoSpec, Objective
from kubelora.api.cel import Rule, cel, quote
from kubelora.api.combine import CombineSpec
from kubelora.api.common import (
    AnyUri,
    ApiModel,
    Condition,
    Digest,
    Quantity,
    Resources,
    SecretName,
    UriField,
)
from kubelora.api.evaluation import EvaluationResult, EvaluationSpec, LossSpike
from kubelora.api.merged import MergedModelInfo, MergedOutputSpec
from kubelora.api.preflight import PreflightSpec
from kubelora.api.reasons import ConditionType, JobPhase, Reason

DEFAULT_EVAL_SPLIT = 0.1
TERMINAL = (JobPhase.SUCCEEDED, JobPhase.FAILED)
TRAINING_FIELDS = ("base_model", "dataset", "output", "method", "lora", "quantization", "training",
                   "combine", "objective", "dpo", "evaluation")
"""The LoRAJobSpec fields that define what is trained: frozen while a run is in progress."""
DATASET_XOR_COMBINE = Rule("has(self.dataset) != has(self.combine)",
                           "set either dataset (train an adapter) or combine (combine published adapters), not both")

EVAL_SPLIT_XOR_URI = Rule("!has(self.evalUri) || !has(self.evalSplit) || self.evalSplit == 0.0",
                          "dataset: set either evalSplit or evalUri, not both")
FSDP_NEEDS_PROCESSES = Rule(
    "!has(self.distributed) || !has(self.distributed.strategy) || self.distributed.strategy != 'fsdp' || "
    "(has(self.resources) && ((has(self.resources.nodes) && self.resources.nodes > 1) || "
    "(has(self.resources.gpus) && self.resources.gpus > 1)))",
    "distributed.strategy fsdp shards the model over several processes: set resources.nodes > 1 or "
    "resources.gpus > 1, or use strategy auto or ddp", field_path=".distributed.strategy")
MAX_NODES = 64
ALL_LINEAR = "all-linear"
MAX_TARGET_MODULES = 64
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=128)]
ALL_LINEAR_ALONE = Rule(f"!has(self.targetModules) || !({quote(ALL_LINEAR)} in self.targetModules) || "
                        "size(self.targetModules) == 1",
                        f"lora.targetModules: {ALL_LINEAR} already covers every linear layer; list it alone "
                        "or list module names only", field_path=".targetModules")
QUANTIZATION_ONLY_FOR_QLORA = Rule(
    "self.method == 'qlora' || !has(self.quantization)",
    "quantization is only used with method: qlora; remove it or set method: qlora", field_path=".quantization")


class BaseModelSource(ApiModel):
    """The model to fine-tune."""

    uri: AnyUri
    """pvc://claim/dir, s3://bucket/key, https://..., hf://org/name[@revision] or file:///abs/dir."""
    credentials_secret_ref: SecretName | None = None
    """Name of a Secret in the same namespace: HF_TOKEN for hf://, AWS_* keys for s3://."""


class DatasetSource(ApiModel):
    """The training data: JSON Lines, JSON or Parquet, one file or a directory."""

    model_config = ConfigDict(json_schema_extra=cel(EVAL_SPLIT_XOR_URI))

    uri: UriField("pvc", "s3", "https", "file")  # type: ignore[valid-type]
    """Where the data is: pvc://, s3://, https:// or file:// (.jsonl, .json, .parquet or a directory)."""
    format: Literal["auto", "messages", "prompt-completion", "text"] = "auto"
    """Row shape. auto detects it from the first row's keys."""
    eval_split: float | None = Field(default=None, ge=0.0, le=0.5)
    """Fraction held out for evaluation (deterministic by seed). Default 0.1 unless evalUri is set."""
    eval_uri: UriField("pvc", "s3", "https", "file") | None = None  # type: ignore[valid-type]
    """A separate evaluation set, instead of evalSplit."""
    credentials_secret_ref: SecretName | None = None
    """Secret with AWS_* keys for s3:// URIs."""

    @model_validator(mode="after")
    def _split_xor_uri(self) -> DatasetSource:
        if self.eval_uri and self.eval_split:
            raise ValueError(EVAL_SPLIT_XOR_URI.message)
        return self

    @property
    def effective_eval_split(self) -> float:
        if self.eval_uri:
            return 0.0
        return DEFAULT_EVAL_SPLIT if self.eval_split is None else self.eval_split


class LoraSpec(ApiModel):
    """The adapter's shape (peft LoraConfig)."""

    r: int = Field(default=16, ge=1, le=512)
    """Rank of the update matrices. vLLM serves ranks up to its maxLoraRank (at most 512)."""
    alpha: float = Field(default=32, gt=0, le=4096)
    """Scaling numerator (lora_alpha); the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA update during training (lora_dropout)."""
    model_config = ConfigDict(json_schema_extra=cel(ALL_LINEAR_ALONE))

    target_modules: list[ModuleName] = Field(default=[ALL_LINEAR], min_length=1, max_length=MAX_TARGET_MODULES)
    """Module names the adapter wraps, as peft takes them ([q_proj, v_proj]); [all-linear]: every linear layer."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    @model_validator(mode="after")
    def _all_linear_alone(self) -> LoraSpec:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(ALL_LINEAR_ALONE.message)
        return self

    @property
    def target_modules_value(self) -> str | list[str]:
        """peft's target_modules: the string "all-linear" (peft expands it itself) or the list of names."""
        return ALL_LINEAR if self.target_modules == [ALL_LINEAR] else list(self.target_modules)


class QuantizationSpec(ApiModel):
    """4-bit loading of the frozen base (bitsandbytes); method qlora only."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the base weights; nf4 (NormalFloat) is the QLoRA default."""
    double_quant: bool = True
    """Also quantize the quantization constants (a little less memory)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for the matrix multiplications."""


Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
Optimizer = Literal[
    "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]


class TrainingSpec(ApiModel):
    """Hyperparameters (TRL SFTConfig). Defaults follow the QLoRA recipe."""

    epochs: int = Field(default=3, ge=1, le=100)
    """Passes over the training set (ignored when maxSteps is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (overrides epochs); handy for smoke runs."""
    learning_rate: float = Field(default=2.0e-4, gt=0.0, le=1.0)
    """Peak learning rate of the LoRA weights."""
    scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warmup (transformers lr_scheduler_type)."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Fraction of the steps spent ramping the learning rate up from 0."""
    batch_size: int = Field(default=4, ge=1, le=1024)
    """Per-device micro-batch size."""
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=1024)
    """Micro-batches per optimizer step; the effective batch is batchSize x this x processes."""
    max_seq_length: int = Field(default=2048, ge=16, le=131072)
    """Longest tokenized sample allowed; longer samples fail pre-flight with their line number."""
    packing: bool = True
    """Pack samples into full rows on GPU (padding-free batching on CPU)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass instead of keeping them: less memory, more compute."""
    optimizer: Optimizer = "paged_adamw_32bit"
    """Optimizer (transformers optim); the paged ones spill optimizer state to CPU memory under pressure."""
    eval_steps: int = Field(default=50, ge=1)
    """Evaluate on the held-out set every this many steps (status.progress.evalLoss)."""
    save_steps: int = Field(default=50, ge=1)
    """Checkpoint interval; a retried or resumed Job continues from the newest checkpoint."""
    seed: int = Field(default=42, ge=0)
    """Seed for the data split, shuffling and LoRA initialisation."""


class TrainingResources(Resources):
    """Compute for the training pods: `gpus` on each of `nodes` pods; pre-flight runs on one small CPU pod."""

    gpus: int = Field(default=1, ge=0, le=16)
    """`nvidia.com/gpu` per node (per pod), one training process each. 0 runs on CPU, one process per node
    (slow; for local clusters and tests)."""
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    """Pods (nodes) that train together. 1: one pod, one Job. More: an Indexed Job of that many pods plus a
    headless Service; the pods rendezvous at pod 0 (torchrun, c10d) and restart together from the newest
    checkpoint when one is lost. The output (checkpoints) must be on storage every node reaches: a
    ReadWriteMany claim or s3://."""
    gpu_memory: Quantity | None = None
    """Memory of one GPU, e.g. 80Gi. Pre-flight estimates memory per GPU for the plan (base weights,
    LoRA weights, gradients and optimizer state, activations at maxSeqLength x batchSize) and refuses a
    plan that cannot fit, naming the smallest one that would. On GPU nodes the trainer checks again with
    the memory it finds."""


class DistributedSpec(ApiModel):
    """How the processes of a multi-GPU or multi-node run share the work (PyTorch distributed)."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """ddp: every process holds the whole (frozen) base and a LoRA replica, gradients are all-reduced.
    fsdp: base weights, LoRA weights, gradients and optimizer state are sharded over all processes (FSDP2);
    with qlora the 4-bit storage dtype is set to the compute dtype, as FSDP needs one float dtype to shard.
    auto: ddp when pre-flight's memory estimate fits one GPU, fsdp otherwise. Ignored with a single process."""


class OutputSpec(ApiModel):
    """Where the adapter is published (rev-<revision>/ below this URI)."""

    uri: UriField("pvc", "s3", "file")  # type: ignore[valid-type]
    """pvc://, s3:// or file:// directory."""
    credentials_secret_ref: SecretName | None = None
    """Secret with AWS_* keys for s3:// URIs."""
    merged: MergedOutputSpec | None = None
    """Also publish the base with the adapter merged in, at rev-<revision>/merged/ (its own manifest and digest)."""


class LoRAJobSpec(ApiModel):
    """Desired state of a LoRAJob."""

    model_config = ConfigDict(json_schema_extra=cel(QUANTIZATION_ONLY_FOR_QLORA, FSDP_NEEDS_PROCESSES,
                                                    DATASET_XOR_COMBINE, DPO_NEEDS_A_DATASET))

    base_model: BaseModelSource
    """The model to fine-tune."""
    dataset: DatasetSource | None = None
    """The training (and optional evaluation) data; set this or combine."""
    combine: CombineSpec | None = None
    """Combine published adapters into a new one instead of training (peft add_weighted_adapter); set this or
    dataset. method, lora and training do not apply (training.seed seeds DARE's random drop)."""
    output: OutputSpec
    """Where the adapter is published."""
    method: Literal["qlora", "lora"] = "qlora"
    """qlora loads the frozen base in 4 bits; lora in bf16/fp32."""
    objective: Objective = "sft"
    """sft: learn from examples (messages, prompt-completion, text). dpo: learn from preference pairs (rows of
    prompt, chosen, rejected; strings or lists of messages; the prompt may be left implicit in conversations)
    with TRL's DPOTrainer, the base model (adapter disabled) as the reference."""
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    """DPO hyperparameters (objective dpo only)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """The adapter's shape: rank, alpha, dropout, target modules."""
    quantization: QuantizationSpec | None = None
    """qlora only; defaults to nf4 + double quant + bfloat16 compute."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyperparameters; frozen while a run is in progress."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Held-out metrics for the adapter and the base, reference answers, early stopping, loss-spike warnings and
    the promotion gate."""
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)
    """Extra pre-flight checks: the overfit-batch smoke run before the long run."""
    resources: TrainingResources = Field(default_factory=TrainingResources)
    """GPUs, nodes, requests, limits and placement of the training pods."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """How several GPUs or nodes share the work."""
    image: str = ""
    """Trainer image; empty uses the operator's default."""
    backoff_limit: int = Field(default=2, ge=0, le=20)
    """Retries of the training pod; each resumes from the newest checkpoint."""
    active_deadline_seconds: int = Field(default=86400, ge=60)
    """Longest a training attempt may run before its Job is failed (Job activeDeadlineSeconds)."""
    suspend: bool = False
    """true stops training and keeps checkpoints; false resumes from the newest one."""
    queue_name: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Kueue LocalQueue of the training Job: it is created suspended and runs once Kueue admits it."""

    @model_validator(mode="after")
    def _quantization_only_for_qlora(self) -> LoRAJobSpec:
        if self.method == "lora" and self.quantization is not None:
            raise ValueError(QUANTIZATION_ONLY_FOR_QLORA.message)
        return self

    @model_validator(mode="after")
    def _dataset_xor_combine(self) -> LoRAJobSpec:
        if (self.dataset is None) == (self.combine is None):
            raise ValueError(DATASET_XOR_COMBINE.message)
        return self

    @model_validator(mode="after")
    def _dpo_needs_a_dataset(self) -> LoRAJobSpec:
        if self.objective == "dpo" and self.dataset is None:
            raise ValueError(DPO_NEEDS_A_DATASET.message)
        return self

    @property
    def training_dataset(self) -> DatasetSource:
        """The dataset of a training run (every spec without combine has one)."""
        if self.dataset is None:
            raise ValueError("this LoRAJob combines adapters; it has no dataset")
        return self.dataset

    @model_validator(mode="after")
    def _fsdp_needs_processes(self) -> LoRAJobSpec:
        if self.distributed.strategy == "fsdp" and self.resources.nodes <= 1 and self.resources.gpus <= 1:
            raise ValueError(FSDP_NEEDS_PROCESSES.message)
        return self

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU on every node, one per node on CPU (gpus: 0)."""
        return self.resources.nodes * max(1, self.resources.gpus)

    @property
    def effective_quantization(self) -> QuantizationSpec | None:
        if self.method != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    def training_fields(self) -> dict[str, Any]:
        """The fields that define what is trained; they cannot change while a run is in progress."""
        return self.model_dump(
            mode="json", by_alias=True, include=set(TRAINING_FIELDS))


def _alias(name: str) -> str:
    return LoRAJobSpec.model_fields[name].alias or name


def _same(field: str) -> str:
    new, old = f"self.spec.{field}", f"oldSelf.spec.{field}"
    return f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"


def training_fields_frozen() -> Rule:
    """The transition rule on the whole LoRAJob that mirrors the reconciler's deferral of training changes.

    Once a run has a training Job and is not finished (``status.jobName`` set, phase not terminal), the
    reconciler keeps training with the values the run started with; refusing the change at apply time says
    so at once. A change made before this rule existed (Validated=False/SpecImmutable) stays revertable.
    """
    running = (f"has(oldSelf.status) && has(oldSelf.status.jobName) && has(oldSelf.status.phase) && "
               f"!(oldSelf.status.phase in [{', '.join(quote(p) for p in TERMINAL)}])")
    drifted = (f"has(oldSelf.status.conditions) && oldSelf.status.conditions.exists(c, "
               f"c.type == {quote(ConditionType.VALIDATED)} && c.reason == {quote(Reason.SPEC_IMMUTABLE)})")
    same = " && ".join(_same(_alias(f)) for f in TRAINING_FIELDS)
    fields = ", ".join(_alias(f) for f in TRAINING_FIELDS)
    return Rule(f"!({running}) || ({drifted}) || ({same})",
                f"spec fields {fields} cannot change while a run is in progress (status.jobName is set): the run "
                "keeps the values it started with. Revert the change, apply it after the run ends (it then starts "
                "a new run), or delete and re-create the LoRAJob to start over now")


class AdapterInfo(ApiModel):
    """The published adapter."""

    uri: str
    """Where the adapter's files are: <output.uri>/rev-<revision>."""
    digest: Digest
    size_bytes: int = Field(ge=0)
    """Total size of the adapter's files."""
    rank: int = Field(ge=1)
    """LoRA rank r (an AdapterDeployment's vllm.maxLoraRank must be at least this)."""
    base_model: str
    """The base model URI it was trained on."""
    peft_type: str = "LORA"
    """peft's adapter type (LORA)."""


class Progress(ApiModel):
    """Live training progress, published by the trainer."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int = 0
    """Optimizer steps the run will take."""
    epoch: float = 0.0
    """Epochs done, fractional."""
    percent: int = Field(default=0, ge=0, le=100)
    """step / totalSteps, in percent."""
    loss: float | None = None
    """Training loss of the last logged step."""
    eval_loss: float | None = None
    """Loss on the held-out set at the last evaluation."""
    learning_rate: float | None = None
    """Learning rate at the last logged step."""
    reward_margin: float | None = None
    """objective dpo: mean chosen-minus-rejected implicit reward at the last logged step (rewards/margins)."""
    reward_accuracy: float | None = None
    """objective dpo: fraction of pairs whose chosen answer out-scores the rejected one (rewards/accuracies)."""
    tokens_per_second: float | None = None
    """Training throughput over the last interval."""
    eta_seconds: int | None = None
    """Estimated seconds until the run finishes."""
    last_checkpoint: str | None = None
    """Newest checkpoint a retried or resumed pod continues from."""
    updated_at: str | None = None
    """When the trainer last wrote this (RFC 3339)."""
    adapter: AdapterInfo | None = None
    """Set by the trainer once the adapter is published: the result survives its pod."""
    loss_spike: LossSpike | None = None
    """Set by the trainer when a logged loss spiked (spec.evaluation.lossSpikeFactor): the LossSpike condition."""


class LoRAJobStatus(ApiModel):
    """Observed state of a LoRAJob."""

    phase: JobPhase = JobPhase.PENDING
    """Pending, Validating, Queued, Running, Suspended, Succeeded or Failed."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    revision: int | None = None
    """The generation whose spec is being (or was) trained; output goes to rev-<revision>/."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Reconciling, Stalled (kstatus), Validated, Running, Succeeded."""
    job_name: str | None = None
    """The training Job of the current revision, once created."""
    validation_job_name: str | None = None
    """The pre-flight Job of the current revision."""
    start_time: str | None = None
    """When the training Job was created (RFC 3339)."""
    completion_time: str | None = None
    """When the run ended (RFC 3339)."""
    attempts: int = 0
    """Attempts of the training Job of this revision, the one in progress included (each retry resumes from
    a checkpoint)."""
    progress: Progress | None = None
    """Live progress, written by the trainer."""
    adapter: AdapterInfo | None = None
    """The adapter of this revision, once published."""
    last_succeeded_adapter: AdapterInfo | None = None
    """The newest adapter any revision published; kept while a retrain runs or fails, so serving can stay on it."""
    promoted_adapter: AdapterInfo | None = None
    """The newest adapter that passed spec.evaluation.gate (every published one without a gate): what an
    AdapterDeployment following this LoRAJob serves."""
    evaluation: EvaluationResult | None = None
    """What evaluation measured for this revision: adapter vs base, reference similarity, samples, the gate."""
    merged: MergedModelInfo | None = None
    """The merged model of this revision (spec.output.merged), once published."""
    message: str | None = None
    """Human summary of the latest transition."""

    @field_validator("conditions")
    @classmethod
    def _sorted(cls, value: list[Condition]) -> list[Condition]:
        return sorted(value, key=lambda c: c.type)


class LoRAJob(ApiModel):
    """A QLoRA/LoRA fine-tuning run."""

    api_version: Literal["kubelora.io/v1alpha1"] = "kubelora.io/v1alpha1"
    kind: Literal["LoRAJob"] = "LoRAJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LoRAJobSpec
    status: LoRAJobStatus | None = None
