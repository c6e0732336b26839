"""Types shared by both kinds: the model base class, conditions, resources, URIs as fields."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubelora.api.uris import ALL_SCHEMES, Scheme, URIError, parse_uri

GROUP = "kubelora.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$"
_DIGEST = r"^sha256:[0-9a-f]{64}$"
_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ApiModel(BaseModel):
    """Base for every API type: camelCase on the wire, unknown fields rejected, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """Parse a stored object as the API server typed it: strict JSON types (no ``"5"`` or ``true`` for
        an integer), as the CRD schema demands, so the model and the CRD agree on what is valid."""
        return cls.model_validate_json(json.dumps(data), strict=True)

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as stored in Kubernetes (camelCase, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _uri_checker(*schemes: Scheme) -> AfterValidator:
    def check(value: str) -> str:
        try:
            parse_uri(value, schemes)
        except URIError as exc:
            raise ValueError(str(exc)) from None
        return value.strip()

    return AfterValidator(check)


def uri_pattern(*schemes: Scheme) -> str:
    return "^(" + "|".join(schemes) + ")://.+$"


def UriField(*schemes: Scheme) -> Any:
    # The pattern is for the CRD schema only; pydantic runs the parser, whose messages say more.
    return Annotated[str, Field(json_schema_extra={"pattern": uri_pattern(*schemes)}), _uri_checker(*schemes)]


AnyUri = UriField(*ALL_SCHEMES)
Digest = Annotated[str, Field(pattern=_DIGEST, description="sha256:<64 hex digits>")]
DnsLabel = Annotated[str, Field(pattern=_DNS1123, min_length=1, max_length=63)]
Quantity = Annotated[str, Field(pattern=_QUANTITY)]
SecretName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]


class Toleration(ApiModel):
    """A pod toleration, as in core/v1."""

    key: str | None = None
    """The taint key to match; empty with operator Exists matches every taint."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """Equal matches the taint value; Exists matches any value of the key."""
    value: str | None = None
    """The taint value to match (operator Equal)."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Empty matches every effect (as in core/v1)."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """With effect NoExecute: how long the pod stays bound after the taint appears; unset is forever."""


class Resources(ApiModel):
    """Compute for the pods: GPUs plus the usual requests, limits and placement."""

    gpus: int = Field(default=1, ge=0, le=16)
    """Number of `nvidia.com/gpu` per pod. 0 runs on CPU (slow; for local clusters and tests)."""
    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Extra resource requests, e.g. {cpu: "8", memory: 64Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Extra resource limits."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate, e.g. a dedicated GPU node pool."""
    priority_class_name: str | None = None
    """PriorityClass of the pods (scheduling order and preemption)."""


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    """Ready, Reconciling or Stalled (both kinds); Validated, Running, Succeeded (LoRAJob); Progressing,
    Degraded (AdapterDeployment)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = ""
    """CamelCase reason for the last transition (see docs/api.md for each value)."""
    message: str = ""
    """What happened, in words; for Stalled, what to fix."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition describes."""


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def upsert_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Replace the condition of the same type, keeping lastTransitionTime when the status is unchanged.

    Keeping the time is what makes repeated reconciles idempotent: the same facts give the same status.
    """
    out: list[Condition] = []
    for cond in conditions:
        if cond.type != new.type:
            out.append(cond)
            continue
        if cond.status == new.status and cond.last_transition_time:
            new = new.model_copy(update={"last_transition_time": cond.last_transition_time})
    if not new.last_transition_time:
        new = new.model_copy(update={"last_transition_time": now_rfc3339()})
    out.append(new)
    return sorted(out, key=lambda c: c.type)


def digest_ok(value: str) -> bool:
    return bool(re.match(_DIGEST, value))
