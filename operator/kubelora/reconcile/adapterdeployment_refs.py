"""Resolve an AdapterDeployment's adapter sources into what the agents load.

A ``uri`` adapter is passed through. A ``loraJobRef`` adapter is served from the LoRAJob's published
``status.adapter``: while the job has none yet the adapter is Pending (LoRAJobNotReady), a failed or missing
job fails only that adapter, and a new successful run (a new digest) rolls the adapter forward by changing
only the ConfigMap. A job that is retrained keeps being served from the adapter it published before (found
in the deployment's own status, under that job's output URI, or the job's ``status.promotedAdapter``) until
the new one is published, and a failed retraining does not take the last good adapter away: both show as a
reason on the still-served adapter. A retraining that succeeds but misses ``spec.evaluation.gate`` is not
served either (the LoRAJob's Promoted=False): the deployment keeps the promoted adapter, noted GateFailed.
Checks that need nothing but the LoRAJob status (digest pin, peft type, rank, count) are decided here, so
a bad adapter never reaches the pods; the rest (files, base model) is the agent's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from kubelora.api.adapterdeployment import AdapterDeploymentSpec, AdapterSource, AdapterStatus
from kubelora.api.lorajob import AdapterInfo
from kubelora.api.reasons import ConditionType, JobPhase, Reason
from kubelora.api.runtime import DesiredAdapter
from kubelora.api.uris import is_within

Verdict = Literal["Pending", "Failed"]


@dataclass(frozen=True)
class JobView:
    """The part of a LoRAJob the serving side needs (what the operator keeps in its lorajobs index)."""

    name: str
    phase: str
    adapter: AdapterInfo | None = None
    output_uri: str | None = None
    message: str = ""
    promoted: AdapterInfo | None = None
    """``status.promotedAdapter``: the newest adapter that passed the LoRAJob's evaluation gate."""
    not_promoted: str = ""
    """The Promoted=False message of a run that succeeded but missed its gate (its adapter is not served)."""


def _adapter_info(raw: Any) -> AdapterInfo | None:
    if not raw:
        return None
    try:
        return AdapterInfo.model_validate(raw)
    except ValidationError:
        return None


def job_view(body: Mapping[str, Any]) -> JobView:
    """Reduce a LoRAJob object to a JobView; a malformed adapter counts as no adapter.

    The adapter a deployment follows is the one the LoRAJob promoted: a run that succeeded but missed its
    evaluation gate offers no adapter (``not_promoted`` says why), and the promoted one stays available.
    A status written before promotion existed (no Promoted condition) offers ``status.adapter`` as before.
    """
    status = body.get("status") or {}
    adapter = _adapter_info(status.get("adapter"))
    phase = str(status.get("phase") or JobPhase.PENDING)
    gate = next((c for c in status.get("conditions") or [] if c.get("type") == ConditionType.PROMOTED), None)
    not_promoted = ""
    if gate is not None and gate.get("status") == "False" and phase == JobPhase.SUCCEEDED:
        adapter, not_promoted = None, str(gate.get("message") or "its adapter missed the evaluation gate")
    return JobView(
        name=body["metadata"]["name"],
        phase=phase,
        adapter=adapter,
        output_uri=((body.get("spec") or {}).get("output") or {}).get("uri"),
        message=_job_message(status, phase),
        promoted=_adapter_info(status.get("promotedAdapter")),
        not_promoted=not_promoted,
    )


def _job_message(status: Mapping[str, Any], phase: str) -> str:
    wanted = (ConditionType.SUCCEEDED, ConditionType.READY) if phase == JobPhase.FAILED else (ConditionType.RUNNING,)
    for kind in wanted:
        for cond in status.get("conditions") or []:
            if cond.get("type") == kind and cond.get("message"):
                return str(cond["message"])
    percent = (status.get("progress") or {}).get("percent")
    return f"{percent}% trained" if percent is not None and phase == JobPhase.RUNNING else ""


@dataclass(frozen=True)
class ResolvedAdapter:
    """One adapter after resolution. ``verdict`` None means "hand it to the agents"; a reason and message
    without a verdict are a note on an adapter that is still served (e.g. its LoRAJob is retraining)."""

    name: str
    uri: str | None = None
    digest: str | None = None
    verdict: Verdict | None = None
    reason: str = ""
    message: str = ""
    claim_uri: str | None = None
    """A URI whose PVC the pods must mount for this adapter, known even before a LoRAJob publishes."""

    @property
    def desired(self) -> DesiredAdapter | None:
        if self.verdict is not None or self.uri is None:
            return None
        return DesiredAdapter(name=self.name, uri=self.uri, digest=self.digest)


def _pending(source: AdapterSource, reason: Reason, message: str, claim: str | None) -> ResolvedAdapter:
    return ResolvedAdapter(source.name, verdict="Pending", reason=reason, message=message, claim_uri=claim)


def _failed(source: AdapterSource, reason: Reason, message: str, uri: str | None = None,
            digest: str | None = None) -> ResolvedAdapter:
    return ResolvedAdapter(source.name, uri=uri, digest=digest, verdict="Failed", reason=reason, message=message,
                           claim_uri=uri)


def _kept(source: AdapterSource, job: JobView, previous: AdapterStatus | None) -> ResolvedAdapter | None:
    """The adapter this deployment last served from ``job``, if the status still names one."""
    if previous is None or not previous.uri or not previous.digest or not job.output_uri:
        return None
    if not is_within(previous.uri, job.output_uri):
        return None  # served from another job before loraJobRef was changed
    if source.digest and source.digest != previous.digest:
        return None
    return ResolvedAdapter(source.name, uri=previous.uri, digest=previous.digest, claim_uri=previous.uri)


def _promoted(source: AdapterSource, job: JobView, spec: AdapterDeploymentSpec) -> ResolvedAdapter | None:
    """The LoRAJob's promoted adapter, when this deployment may serve it (pin, output, peft type, rank)."""
    info = job.promoted
    if info is None or not job.output_uri or not is_within(info.uri, job.output_uri):
        return None
    if (source.digest and source.digest != info.digest) or info.peft_type.upper() != "LORA" \
            or info.rank > spec.vllm.max_lora_rank:
        return None
    return ResolvedAdapter(source.name, uri=info.uri, digest=info.digest, claim_uri=info.uri)


def _noted(kept: ResolvedAdapter, reason: Reason, message: str) -> ResolvedAdapter:
    return ResolvedAdapter(kept.name, uri=kept.uri, digest=kept.digest, reason=reason, message=message,
                           claim_uri=kept.claim_uri)


def _from_job(source: AdapterSource, job: JobView | None, spec: AdapterDeploymentSpec,
              previous: AdapterStatus | None) -> ResolvedAdapter:
    assert source.lora_job_ref is not None
    ref = source.lora_job_ref.name
    if job is None:
        return _failed(source, Reason.LORAJOB_NOT_FOUND, f"LoRAJob {ref!r} does not exist in this namespace")
    info = job.adapter
    kept = (_kept(source, job, previous) or _promoted(source, job, spec)) if info is None else None
    if info is None and job.not_promoted:
        if kept is not None:
            return _noted(kept, Reason.GATE_FAILED, f"LoRAJob {ref!r}: {job.not_promoted}")
        return _pending(source, Reason.GATE_FAILED, f"LoRAJob {ref!r}: {job.not_promoted}; waiting for an adapter "
                        "that passes the gate", job.output_uri)
    if job.phase == JobPhase.FAILED:
        detail = f": {job.message}" if job.message else ""
        if kept is not None:
            return _noted(kept, Reason.LORAJOB_FAILED,
                          f"LoRAJob {ref!r} failed{detail}; still serving its previous adapter {kept.uri}")
        if info is None:
            return _failed(source, Reason.LORAJOB_FAILED, f"LoRAJob {ref!r} failed{detail}")
    if info is None:
        detail = f" ({job.message})" if job.message else ""
        if kept is not None:
            return _noted(kept, Reason.LORAJOB_NOT_READY,
                          f"LoRAJob {ref!r} is {job.phase}{detail}; serving its previous adapter until it publishes")
        return _pending(source, Reason.LORAJOB_NOT_READY,
                        f"LoRAJob {ref!r} is {job.phase}{detail}; waiting for its adapter", job.output_uri)
    if not job.output_uri or not is_within(info.uri, job.output_uri):
        return _failed(source, Reason.ADAPTER_OUTSIDE_OUTPUT,
                       f"LoRAJob {ref!r} reports an adapter at {info.uri}, outside its spec.output.uri "
                       f"{job.output_uri}: not served", info.uri, info.digest)
    if source.digest and source.digest != info.digest:
        return _failed(source, Reason.DIGEST_MISMATCH,
                       f"pinned digest {source.digest} but LoRAJob {ref!r} published {info.digest}",
                       info.uri, info.digest)
    if info.peft_type.upper() != "LORA":
        return _failed(source, Reason.NOT_LORA, f"LoRAJob {ref!r} published a {info.peft_type} adapter; only LORA "
                       "can be served", info.uri, info.digest)
    if info.rank > spec.vllm.max_lora_rank:
        return _failed(source, Reason.RANK_TOO_LARGE,
                       f"rank {info.rank} > vllm.maxLoraRank {spec.vllm.max_lora_rank}", info.uri, info.digest)
    if job.phase == JobPhase.FAILED:
        return ResolvedAdapter(source.name, uri=info.uri, digest=info.digest, claim_uri=info.uri,
                               reason=Reason.LORAJOB_FAILED,
                               message=f"LoRAJob {ref!r} failed; still serving its published adapter {info.uri}")
    return ResolvedAdapter(source.name, uri=info.uri, digest=info.digest, claim_uri=info.uri)


def resolve_adapters(spec: AdapterDeploymentSpec, jobs: Mapping[str, JobView],
                     previous: Sequence[AdapterStatus] = ()) -> list[ResolvedAdapter]:
    """Resolve every adapter in spec order; ``jobs`` maps LoRAJob names (same namespace) to their views and
    ``previous`` is the deployment's current ``status.adapters`` (what it served last).

    Every adapter is resolved on its own: vllm.maxCpuLoras is the size of vLLM's LRU cache of loaded
    weights, not a limit on how many adapters one deployment serves.
    """
    out: list[ResolvedAdapter] = []
    before = {a.name: a for a in previous}
    for source in spec.adapters:
        if source.lora_job_ref is not None:
            resolved = _from_job(source, jobs.get(source.lora_job_ref.name), spec, before.get(source.name))
        else:
            resolved = ResolvedAdapter(source.name, uri=source.uri, digest=source.digest, claim_uri=source.uri)
        out.append(resolved)
    return out


def referenced_jobs(spec: AdapterDeploymentSpec) -> set[str]:
    return {a.lora_job_ref.name for a in spec.adapters if a.lora_job_ref is not None}
