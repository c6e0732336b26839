"""Combining adapters: a LoRAJob with ``spec.combine`` trains nothing; it merges published adapters into a new one.

peft's ``add_weighted_adapter`` does the arithmetic (linear, TIES, DARE, concatenation); the result is a
standard adapter published like a trained one, whose manifest lists each input's URI, digest and weight.
Inputs are named by ``loraJobRef`` (the operator resolves the referenced LoRAJob's published adapter when
the revision starts, and pins it by digest in the run config) or by ``uri`` (with an optional digest pin).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from kubelora.api.cel import Rule, cel
from kubelora.api.common import ApiModel, Digest, UriField

MAX_INPUTS = 16
CombineMethod = Literal["linear", "ties", "dare_linear", "dare_ties", "cat"]
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
"""Methods that add the inputs' matrices element by element: every input needs the same rank."""
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
"""Methods that keep only a fraction ``density`` of each input's update (TIES trims, DARE drops at random)."""
EXACTLY_ONE_SOURCE = Rule("has(self.loraJobRef) != has(self.uri)", "combine.inputs: set exactly one of loraJobRef "
                          "or uri in each input")
DIGEST_ONLY_WITH_URI = Rule("!has(self.digest) || has(self.uri)", "combine.inputs: digest pins a uri input; a "
                            "loraJobRef input is pinned by the operator to the digest its LoRAJob published",
                            field_path=".digest")
TWO_INPUTS_OR_MORE = Rule("size(self.inputs) >= 2", "combine.inputs: list at least two adapters to combine",
                          field_path=".inputs")


class CombineJobRef(ApiModel):
    """A LoRAJob in the same namespace whose published adapter is an input."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """Name of the LoRAJob; its published adapter (status.adapter once Succeeded) is used."""


class CombineInput(ApiModel):
    """One adapter to combine, by LoRAJob or by URI, with its weight."""

    model_config = ConfigDict(json_schema_extra=cel(EXACTLY_ONE_SOURCE, DIGEST_ONLY_WITH_URI))

    lora_job_ref: CombineJobRef | None = None
    """Use the adapter this LoRAJob published; set this or uri."""
    uri: UriField("pvc", "s3", "https", "file") | None = None  # type: ignore[valid-type]
    """An adapter directory: pvc://, s3://, https:// or file://."""
    digest: Digest | None = None
    """Optional sha256 pin of a uri input; pre-flight fails on a mismatch."""
    weight: float = Field(default=1.0, ge=-10.0, le=10.0)
    """Weight of this adapter's update in the combination."""

    @model_validator(mode="after")
    def _one_source(self) -> CombineInput:
        if (self.lora_job_ref is None) == (self.uri is None):
            raise ValueError(EXACTLY_ONE_SOURCE.message)
        if self.digest is not None and self.uri is None:
            raise ValueError(DIGEST_ONLY_WITH_URI.message)
        return self


class CombineSpec(ApiModel):
    """Combine published adapters into a new one (peft add_weighted_adapter) instead of training."""

    model_config = ConfigDict(json_schema_extra=cel(TWO_INPUTS_OR_MORE))

    inputs: list[CombineInput] = Field(max_length=MAX_INPUTS)
    """The adapters, at least two; all trained on spec.baseModel."""
    method: CombineMethod = "ties"
    """linear: weighted sum. ties: trim each update to its largest `density` fraction, elect a sign per weight,
    average the agreeing ones. dare_linear / dare_ties: drop a random (1 - density) of each update and rescale
    (seeded by spec.training.seed), then sum or TIES. cat: concatenate the low-rank factors (ranks add up; the
    only method for inputs of different ranks). All but cat need the same rank in every input."""
    density: float = Field(default=0.5, gt=0.0, le=1.0)
    """Fraction of each update kept by ties, dare_linear and dare_ties."""
    majority_sign_method: Literal["total", "frequency"] = "total"
    """How TIES elects the sign of each weight: by total magnitude or by the number of inputs."""

    @model_validator(mode="after")
    def _two_inputs(self) -> CombineSpec:
        if len(self.inputs) < 2:
            raise ValueError(TWO_INPUTS_OR_MORE.message)
        return self


class ResolvedInput(ApiModel):
    """An input as the trainer gets it: where it is and the digest it must have (run config, not the CRD)."""

    uri: str
    digest: str | None = None
    weight: float
    source: str = ""
    """namespace/name of the LoRAJob it came from, for the manifest; empty for uri inputs."""


class CombinedInputRecord(ApiModel):
    """One input as the combined adapter's manifest records it."""

    uri: str
    digest: str
    weight: float
    source: str = ""


def resolve_inputs(combine: CombineSpec, namespace: str,
                   published: dict[str, tuple[str, str]]) -> tuple[list[ResolvedInput], list[str]]:
    """Inputs with every loraJobRef replaced by the (uri, digest) its LoRAJob published, and the names of
    referenced LoRAJobs that have published nothing yet."""
    resolved: list[ResolvedInput] = []
    missing: list[str] = []
    for item in combine.inputs:
        if item.uri is not None:
            resolved.append(ResolvedInput(uri=item.uri, digest=item.digest, weight=item.weight))
            continue
        assert item.lora_job_ref is not None
        name = item.lora_job_ref.name
        if name not in published:
            missing.append(name)
            continue
        uri, digest = published[name]
        resolved.append(ResolvedInput(uri=uri, digest=digest, weight=item.weight, source=f"{namespace}/{name}"))
    return resolved, missing
