"""Phases, condition types and reasons: every value that appears in a status, with when it is set.

Both kinds carry the three conditions that kstatus (Flux, kpt, cli-utils) and our Argo CD health
check read, with the meaning the Kubernetes API conventions give them:

- ``Ready``: True when the object has reached what its spec asks for (a LoRAJob published its
  adapter, or is suspended as asked; an AdapterDeployment serves every valid adapter on every
  desired replica). kstatus reads Ready=False as InProgress.
- ``Reconciling`` (abnormal-true): True while the operator or the workload is still working towards
  the spec (pre-flight, queued, training, rolling out); False otherwise. kstatus reads InProgress.
- ``Stalled`` (abnormal-true): True when no progress is possible without the user (bad spec, a
  permission the operator lacks, a pod that cannot be scheduled or pulled, a failed run); False
  otherwise. kstatus reads Failed. The message says what to fix.

``status.observedGeneration`` is the generation these conditions describe; it advances only once
that generation is really applied, so kstatus reads InProgress until then.
"""

from enum import StrEnum


class JobPhase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    """Kueue holds the training Job suspended until its ClusterQueue has quota."""


class DeploymentPhase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    """LoRAJob: the spec and the dataset passed pre-flight."""
    RUNNING = "Running"
    """LoRAJob: the training Job is active."""
    SUCCEEDED = "Succeeded"
    """LoRAJob: the adapter is written and its manifest verified."""
    READY = "Ready"
    """Both kinds: True when the object has reached its goal."""
    RECONCILING = "Reconciling"
    """Both kinds, abnormal-true: work towards the spec is under way (kstatus: InProgress)."""
    STALLED = "Stalled"
    """Both kinds, abnormal-true: no progress without the user; the message says what to fix (kstatus: Failed)."""
    PROGRESSING = "Progressing"
    """AdapterDeployment: pods or adapters are still converging."""
    DEGRADED = "Degraded"
    """AdapterDeployment: serving, but some adapter or replica failed."""
    PROMOTED = "Promoted"
    """LoRAJob: this revision's adapter passed spec.evaluation.gate (or there is none) and is status.promotedAdapter,
    what AdapterDeployments following the LoRAJob serve."""
    LOSS_SPIKE = "LossSpike"
    """LoRAJob, abnormal-true: the training loss jumped well above its recent values (learning rate too high?)."""


class Reason(StrEnum):
    """Condition reasons. Each says which condition carries it and when."""

    INVALID_SPEC = "InvalidSpec"
    """Validated=False: the spec breaks a rule the CRD schema cannot express."""
    SPEC_IMMUTABLE = "SpecImmutable"
    """Validated=False: a training field changed while the job runs; the change is ignored."""
    VALIDATING = "Validating"
    """Validated=Unknown: the pre-flight Job is running."""
    VALIDATION_PASSED = "ValidationPassed"
    """Validated=True: pre-flight read the dataset and base model."""
    WAITING_FOR_INPUTS = "WaitingForInputs"
    """Validated=Unknown: a LoRAJob named in spec.combine.inputs has published no adapter yet; pre-flight starts
    once every one has."""
    INVALID_DATASET = "InvalidDataset"
    """Validated=False: the dataset is unreadable or malformed; the message names file and line."""
    BASE_MODEL_UNAVAILABLE = "BaseModelUnavailable"
    """Validated=False: the base model cannot be found or loaded."""
    PREFLIGHT_FAILED = "PreflightFailed"
    """Validated=False: the pre-flight pod failed without a structured result."""
    JOB_CREATED = "JobCreated"
    """Running=True: the training Job exists and waits for its pod."""
    TRAINING = "Training"
    """Running=True: the trainer reports progress."""
    SUSPENDED = "Suspended"
    """Running=False: spec.suspend is true; the Job was removed, checkpoints kept."""
    COMPLETED = "Completed"
    """Running=False, Succeeded=True: training finished and the adapter was published."""
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    """Succeeded=False: every retry failed."""
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    """Succeeded=False: activeDeadlineSeconds elapsed."""
    TRAINING_FAILED = "TrainingFailed"
    """Succeeded=False: the trainer exited with an error it reported."""
    JOB_REMOVED = "JobRemoved"
    """Succeeded=False: the training Job disappeared before it finished."""
    GATE_PASSED = "GatePassed"
    """Promoted=True: the evaluation met every bound of spec.evaluation.gate."""
    NO_GATE = "NoGate"
    """Promoted=True: spec.evaluation has no gate, so every published adapter is promoted."""
    GATE_FAILED = "GateFailed"
    """Promoted=False: the run succeeded, but its evaluation missed spec.evaluation.gate; the adapter is published
    and serving stays on status.promotedAdapter. A Warning Event says which bound was missed."""
    NOT_EVALUATED = "NotEvaluated"
    """Promoted=Unknown while the run works, False when it failed: there is no evaluated adapter to promote."""
    LOSS_SPIKED = "LossSpiked"
    """LossSpike=True: a logged training loss exceeded the median of the previous ones by the spike factor."""
    LOSS_STEADY = "LossSteady"
    """LossSpike=False: no spike seen in this revision so far."""
    CHAT_TEMPLATE = "ChatTemplate"
    """Normal Event when pre-flight passes: the first training row as rendered, supervised tokens in [[ ]]."""
    QUEUED = "Queued"
    """Reconciling=True: Kueue holds the training Job until its ClusterQueue has quota."""
    UNSCHEDULABLE = "Unschedulable"
    """Ready=False with the scheduler's message: LoRAJob Reconciling=True (it may queue for capacity);
    AdapterDeployment Reconciling=True at first, Stalled=True once a serving pod has waited longer than a
    rollout needs to free a GPU (``UNSCHEDULABLE_GRACE_SECONDS`` in reconcile/adapterdeployment_status.py)."""
    POD_BLOCKED = "PodBlocked"
    """Stalled=True: a pod cannot start (image pull, a missing Secret or ConfigMap); the message says which."""
    FORBIDDEN = "Forbidden"
    """Stalled=True: the API server refused the operator a request (RBAC, quota, admission); the message names it."""
    CHILD_REJECTED = "ChildRejected"
    """Stalled=True: the API server rejected a child the operator built (422/400); the message is the server's."""
    REPLICA_FAILURE = "ReplicaFailure"
    """AdapterDeployment Stalled=True: the ReplicaSet cannot create pods (quota, admission, Pod Security);
    the message is the Deployment controller's."""
    API_RETRYING = "ApiRetrying"
    """Reconciling=True, Ready=False: a request to the API server failed in a way a retry may fix (5xx,
    timeout, 429); the operator retries with backoff and keeps the old observedGeneration meanwhile."""
    NAME_CONFLICT = "NameConflict"
    """Stalled=True while an object the operator needs to create exists and belongs to someone else."""

    LORAJOB_NOT_FOUND = "LoRAJobNotFound"
    """Adapter Failed: loraJobRef names a LoRAJob that does not exist."""
    LORAJOB_NOT_READY = "LoRAJobNotReady"
    """Adapter Pending: the referenced LoRAJob is still running."""
    LORAJOB_FAILED = "LoRAJobFailed"
    """Adapter Failed: the referenced LoRAJob failed."""
    ADAPTER_OUTSIDE_OUTPUT = "AdapterOutsideOutput"
    """LoRAJob Failed, or adapter Failed: the trainer reported an adapter outside the LoRAJob's spec.output.uri."""
    DIGEST_MISMATCH = "DigestMismatch"
    """Adapter Failed: the files do not hash to the pinned or published digest."""
    MANIFEST_INVALID = "ManifestInvalid"
    """Adapter Failed: kubelora-manifest.json is missing or inconsistent with the files."""
    NOT_LORA = "NotLoRA"
    """Adapter Failed: adapter_config.json peft_type is not LORA."""
    BASE_MODEL_MISMATCH = "BaseModelMismatch"
    """Adapter Failed: trained on another base model than the one served."""
    UNSUPPORTED_ADAPTER = "UnsupportedAdapter"
    """Adapter Failed: a LoRA variant vLLM refuses (DoRA, modules_to_save, bias) or would serve wrongly
    (PiSSA/OLoRA/LoftQ initialisation not converted back, layer_replication)."""
    RANK_TOO_LARGE = "RankTooLarge"
    """Adapter Failed: rank exceeds vllm.maxLoraRank."""
    TOO_MANY_ADAPTERS = "TooManyAdapters"
    """No longer set (vllm.maxCpuLoras is a cache size, not a cap); kept so old statuses still parse."""
    FETCH_FAILED = "FetchFailed"
    """Adapter Failed: the URI could not be read (after retries)."""
    LOAD_FAILED = "LoadFailed"
    """Adapter Failed: the engine refused to load it."""
    REPLICAS_UNAVAILABLE = "ReplicasUnavailable"
    """Ready=False: fewer ready replicas than desired."""
    ADAPTERS_PENDING = "AdaptersPending"
    """Progressing=True: some adapters are not loaded on every replica yet."""
    ADAPTERS_FAILED = "AdaptersFailed"
    """Degraded=True: at least one adapter failed; the others are served."""
    ALL_READY = "AllReady"
    """Ready=True: every replica is ready and every valid adapter loaded."""
