"""AdapterDeployment: a vLLM (or CPU) server with LoRA adapters attached at runtime."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubelora.api.cel import Rule, cel
from kubelora.api.common import AnyUri, ApiModel, Condition, Digest, Resources, SecretName, UriField
from kubelora.api.reasons import DeploymentPhase
from kubelora.api.uris import ADAPTER_SCHEMES

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"
MAX_ADAPTERS = 1000
"""Adapters one AdapterDeployment may list; CEL rules over the list need a bound to be priced."""

CPU_LORAS_COVER_GPU_LORAS = Rule(
    # The API server checks the schema's `default: {}` against this rule before filling in field defaults.
    "!has(self.maxCpuLoras) || !has(self.maxLoras) || self.maxCpuLoras >= self.maxLoras",
    "vllm.maxCpuLoras must be >= vllm.maxLoras: every adapter resident on a GPU is also cached in CPU memory")
EXACTLY_ONE_SOURCE = Rule(
    "has(self.loraJobRef) != has(self.uri)", "adapter: set exactly one of loraJobRef or uri",
    message_expression="\"adapter '\" + self.name + \"': set exactly one of loraJobRef or uri\"")
NAME_IS_A_SERVICE_NAME = Rule(
    "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "metadata.name must be a DNS-1035 label (at most 63 lowercase letters, digits and '-', starting with a letter): "
    "it names the Service and is the value of the pods' kubelora.io/adapterdeployment label")
"""On the whole object: a CustomResource name may be a 253-character DNS subdomain, a Service name may not."""
NAMES_DO_NOT_SHADOW_BASE = Rule(
    "!has(self.adapters) || !self.adapters.exists(a, a.name == self.baseModel.servedName)",
    "an adapter name equals baseModel.servedName; pick another name",
    message_expression="\"adapter name '\" + self.baseModel.servedName + \"' equals baseModel.servedName; pick "
                       "another name\"", field_path=".adapters")


class ServedBaseModel(ApiModel):
    """The base model every replica serves."""

    uri: AnyUri
    """hf://, pvc:// or file:// location of the base model (the engines load these directly; other schemes end
    Failed with InvalidSpec)."""
    served_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", max_length=128)
    """The model name clients send for the base model."""
    credentials_secret_ref: SecretName | None = None
    """Name of a Secret in the same namespace: HF_TOKEN for hf://."""


class VllmSpec(ApiModel):
    """vLLM engine settings (also honoured by the CPU engine where they apply)."""

    model_config = ConfigDict(json_schema_extra=cel(CPU_LORAS_COVER_GPU_LORAS))

    image: str = ""
    """Server image; empty uses the operator's default."""
    max_loras: int = Field(default=4, ge=1, le=256)
    """Adapters resident on the GPU at once (--max-loras)."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 64
    """Largest adapter rank accepted (--max-lora-rank)."""
    max_cpu_loras: int = Field(default=8, ge=1, le=1024)
    """Size of vLLM's LRU cache of adapter weights in CPU memory (--max-cpu-loras). Not a limit on the adapters
    listed: any number are registered, and those outside the cache are read from disk when requested."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Context length the engine allocates for (--max-model-len); unset uses the model's own."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of each GPU's memory vLLM may use for weights, adapters and KV cache (--gpu-memory-utilization)."""
    extra_args: list[str] = Field(default_factory=list)
    """Appended to the vLLM command line."""

    @model_validator(mode="after")
    def _cpu_loras_cover_gpu_loras(self) -> VllmSpec:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(CPU_LORAS_COVER_GPU_LORAS.message)
        return self


class LoRAJobRef(ApiModel):
    """A LoRAJob in the same namespace whose published adapter is served."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """Name of the LoRAJob; its status.adapter (the newest published adapter) is served."""


class AdapterSource(ApiModel):
    """One adapter to serve: from a LoRAJob or from a URI."""

    model_config = ConfigDict(json_schema_extra=cel(EXACTLY_ONE_SOURCE))

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, max_length=63)
    """The model name clients send to /v1/chat/completions to use this adapter."""
    lora_job_ref: LoRAJobRef | None = None
    """Serve the adapter a LoRAJob published; set this or uri."""
    uri: UriField(*ADAPTER_SCHEMES) | None = None  # type: ignore[valid-type]
    """An adapter folder: pvc://, s3://, https://, file://, hf://org/name[@revision] (a Hub repository) or
    oci://registry/repo[:tag|@sha256:...] (an artifact with one layer per file, as oras push writes it). With no
    kubelora-manifest.json the adapter's files are read as peft wrote them and the agent computes the digest."""
    digest: Digest | None = None
    """Optional sha256 pin (the digest of the adapter's files, as in kubelora-manifest.json); a mismatch fails
    this adapter only."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> AdapterSource:
        if (self.lora_job_ref is None) == (self.uri is None):
            raise ValueError(f"adapter {self.name!r}: set exactly one of loraJobRef or uri")
        return self


class ServiceSpec(ApiModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Service type of the OpenAI-compatible endpoint."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Service port of the OpenAI-compatible endpoint (status.endpoint)."""


class AdapterDeploymentSpec(ApiModel):
    """Desired state of an AdapterDeployment."""

    model_config = ConfigDict(json_schema_extra=cel(NAMES_DO_NOT_SHADOW_BASE))

    base_model: ServedBaseModel
    """The base model every replica loads; adapters must be trained on it."""
    replicas: int = Field(default=1, ge=0, le=100)
    """Serving pods; each loads every listed adapter. Also set through the scale subresource (kubectl scale, HPA)."""
    engine: Literal["vllm", "cpu"] = "vllm"
    """vllm on GPUs; cpu is a transformers+peft engine for local clusters and tests."""
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    """Engine settings: image, LoRA capacity, context length, extra arguments."""
    resources: Resources = Field(default_factory=Resources)
    """GPUs, requests, limits and placement of each serving pod."""
    adapters: list[AdapterSource] = Field(
        default_factory=list, max_length=MAX_ADAPTERS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    """Adapters to serve, keyed by name: the API server refuses a name listed twice."""
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """The Service in front of the replicas."""

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[AdapterSource]) -> list[AdapterSource]:
        seen: set[str] = set()
        for adapter in adapters:
            if adapter.name in seen:
                raise ValueError(f"adapter name {adapter.name!r} is listed twice; names must be unique")
            seen.add(adapter.name)
        return adapters

    @model_validator(mode="after")
    def _names_do_not_shadow_base(self) -> AdapterDeploymentSpec:
        for adapter in self.adapters:
            if adapter.name == self.base_model.served_name:
                raise ValueError(f"adapter name {adapter.name!r} equals baseModel.servedName; pick another name")
        return self


AdapterState = Literal["Pending", "Downloading", "Loading", "Loaded", "Unloading", "Failed"]


MAX_DISAGREEING_REPLICAS = 3
"""Replicas listed per adapter when they disagree with its aggregate state; the status of 1,000 adapters on
many replicas has to stay far below the API server's object size limit (about 1.5 MiB)."""


class ReplicaDisagreement(ApiModel):
    """A replica whose view of an adapter is not the aggregate ``state``."""

    pod: str
    """The replica's pod name."""
    state: AdapterState
    """The adapter's state on that replica."""
    reason: str | None = None
    """Why, when it failed there."""


class AdapterStatus(ApiModel):
    """One adapter, aggregated over replicas: counts, and replicas named only where they disagree."""

    name: str
    """The adapter's name (the model name clients send)."""
    state: AdapterState = "Pending"
    """Pending, Downloading, Loading, Loaded (on every ready replica), Unloading or Failed."""
    digest: str | None = None
    """sha256 of the adapter's files, as verified by the agents."""
    uri: str | None = None
    """Where the adapter is loaded from."""
    loaded_replicas: int = 0
    """Replicas that have it loaded."""
    reason: str = ""
    """Why it is not Loaded, e.g. DigestMismatch, RankTooLarge."""
    message: str = ""
    """Details for reason."""
    last_transition_time: str | None = None
    """When state last changed (RFC 3339)."""
    disagreeing_replicas: list[ReplicaDisagreement] = Field(default_factory=list,
                                                            max_length=MAX_DISAGREEING_REPLICAS)
    """Up to three replicas whose state differs from ``state`` (a replica still loading, one that failed);
    empty when all agree."""


class AdapterDeploymentStatus(ApiModel):
    """Observed state of an AdapterDeployment."""

    phase: DeploymentPhase = DeploymentPhase.PENDING
    """Pending, Progressing, Ready, Degraded or Failed."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Reconciling, Stalled (kstatus), Progressing, Degraded."""
    replicas: int = 0
    """Serving pods that exist."""
    ready_replicas: int = 0
    """Serving pods that are Ready."""
    endpoint: str | None = None
    """OpenAI-compatible base URL inside the cluster: http://<name>.<namespace>.svc:<port>/v1."""
    adapters: list[AdapterStatus] = Field(default_factory=list)
    """Each listed adapter's state across the replicas."""
    adapters_ready: str = "0/0"
    """Loaded adapters / desired adapters, for the printer column."""
    message: str = ""
    """One line: what blocks the spec (Stalled), what is still converging, or empty when Ready."""
    selector: str = ""
    """Label selector of the serving pods, as a string: the scale subresource's labelSelectorPath (HPA)."""


class AdapterDeployment(ApiModel):
    """A multi-LoRA inference server."""

    api_version: Literal["kubelora.io/v1alpha1"] = "kubelora.io/v1alpha1"
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None
