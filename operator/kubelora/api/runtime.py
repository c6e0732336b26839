"""Wire formats between components (not CRDs): operator -> trainer, trainer -> operator, operator <-> agent.

Keeping them beside the API models means a field renamed on one side fails the other side's tests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubelora.api.adapterdeployment import ADAPTER_NAME_PATTERN, AdapterState
from kubelora.api.combine import CombinedInputRecord, ResolvedInput
from kubelora.api.common import ApiModel, Digest
from kubelora.api.evaluation import EvaluationResult
from kubelora.api.lorajob import AdapterInfo, LoRAJobSpec
from kubelora.api.merged import MergedModelInfo
from kubelora.api.preflight import OverfitResult, RenderedRow

MANIFEST_FILE = "kubelora-manifest.json"
EXIT_OK = 0
EXIT_FAILED = 1
"""A failure a retry may fix (I/O, out of memory, a killed node)."""
EXIT_BAD_INPUT = 2
"""Bad input (dataset, spec, base model): retrying cannot help; the Job's podFailurePolicy fails it at once."""
EXIT_STOPPED = 143
"""128 + SIGTERM: stopped gracefully with a checkpoint saved; the podFailurePolicy does not count it."""
TRAINER_CONFIG_PATH = "/etc/kubelora/job.json"
DESIRED_ADAPTERS_KEY = "adapters.json"
ADAPTER_CACHE_DIR = "/var/cache/kubelora/adapters"


class TrainerRunConfig(ApiModel):
    """What the operator hands the trainer (ConfigMap key job.json)."""

    name: str
    namespace: str
    revision: int = Field(ge=1)
    spec: LoRAJobSpec
    combine_inputs: list[ResolvedInput] = Field(default_factory=list)
    """spec.combine.inputs with every loraJobRef resolved by the operator to the uri and digest it published."""


class ValidationStats(ApiModel):
    """Pre-flight findings on the dataset."""

    train_rows: int
    eval_rows: int
    format: str
    max_tokens: int | None = None
    mean_tokens: float | None = None
    total_tokens: int | None = None
    rendered: list[RenderedRow] = Field(default_factory=list)
    """The first training rows as the trainer tokenizes them, supervised tokens between [[ and ]]."""
    overfit: OverfitResult | None = None
    """preflight.overfitBatch's result (training pod)."""


class TrainerResult(ApiModel):
    """The trainer's termination message: one JSON object."""

    ok: bool
    reason: str = ""
    message: str = ""
    adapter: AdapterInfo | None = None
    merged: MergedModelInfo | None = None
    """The merged model, when spec.output.merged asked for one."""
    metrics: dict[str, float] = Field(default_factory=dict)
    validation: ValidationStats | None = None
    evaluation: EvaluationResult | None = None
    """Adapter vs base on the held-out set and the references, with the gate's verdict."""


class AdapterManifest(ApiModel):
    """kubelora-manifest.json: written last, so an adapter without it is incomplete."""

    digest: str
    """sha256 over the sorted (relative path, file sha256) pairs of every other file."""
    files: dict[str, str]
    """Relative path -> sha256 hex of that file."""
    size_bytes: int
    base_model: str
    peft_type: str = "LORA"
    rank: int
    lora_alpha: float
    target_modules: list[str] | str
    method: Literal["qlora", "lora", "combine"]
    """How the adapter was made: trained (qlora, lora) or combined from others (combine)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str
    source: str = ""
    """namespace/name@revision of the LoRAJob that produced it."""
    inputs: list[CombinedInputRecord] = Field(default_factory=list)
    """A combined adapter's inputs: uri, digest and weight of each."""
    combine_method: str | None = None
    """A combined adapter's method (linear, ties, dare_linear, dare_ties, cat)."""


class DesiredAdapter(ApiModel):
    # The same rules as AdapterSource: the agent names a cache directory after the name and the digest, so
    # neither may hold a path separator, a NUL or '..' (the agent checks the path again when it builds it).
    name: str = Field(pattern=ADAPTER_NAME_PATTERN, max_length=63)
    uri: str
    digest: Digest | None = None


class DesiredAdapters(ApiModel):
    """ConfigMap <ad>-adapters, key adapters.json: what every replica's agent must load."""

    base_model: str
    served_name: str
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    adapters: list[DesiredAdapter] = Field(default_factory=list)


class AgentAdapterState(ApiModel):
    name: str
    state: AdapterState
    digest: str | None = None
    uri: str | None = None
    reason: str = ""
    message: str = ""
    since: str | None = None


class AgentReport(ApiModel):
    """GET :8081/adapters of one replica's agent."""

    pod: str = ""
    engine_ready: bool = False
    generation: str = ""
    """resourceVersion of the ConfigMap the agent last applied."""
    adapters: list[AgentAdapterState] = Field(default_factory=list)
