"""The adapters a combining LoRAJob (``spec.combine``) reads: loraJobRef inputs resolved to what they published.

The runner reads each referenced LoRAJob and passes what it published (``Observed.inputs``); here that is
turned into the pinned list that goes into the revision's run config. Until every referenced LoRAJob has
published an adapter, pre-flight does not start and Validated stays Unknown with reason WaitingForInputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubelora.api.combine import ResolvedInput, resolve_inputs
from kubelora.api.lorajob import LoRAJobSpec
from kubelora.api.reasons import JobPhase
from kubelora.reconcile.lorajob_object import LoRAJobObject
from kubelora.reconcile.lorajob_observed import Observed
from kubelora.resources.lorajob_names import validation_job_name

INPUT_POLL_SECONDS = 15.0
"""How often a combining LoRAJob that waits for its inputs looks again (their events do not wake it)."""


def referenced_jobs(spec: LoRAJobSpec | None) -> list[str]:
    """Names of the LoRAJobs a spec's combine inputs refer to, in order, without repeats."""
    if spec is None or spec.combine is None:
        return []
    names = [i.lora_job_ref.name for i in spec.combine.inputs if i.lora_job_ref is not None]
    return list(dict.fromkeys(names))


def published_adapter(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(uri, digest) a referenced LoRAJob offers: its promoted adapter, else the adapter of a Succeeded run."""
    status = body.get("status") or {}
    chosen = status.get("promotedAdapter")
    if not chosen and status.get("phase") == JobPhase.SUCCEEDED:
        chosen = status.get("adapter")
    if not isinstance(chosen, Mapping) or not chosen.get("uri") or not chosen.get("digest"):
        return None
    return str(chosen["uri"]), str(chosen["digest"])


def combine_inputs(spec: LoRAJobSpec, namespace: str, observed: Observed) -> tuple[list[ResolvedInput], list[str]]:
    """The resolved inputs of a combining spec (empty for a training spec) and the LoRAJobs still awaited."""
    if spec.combine is None:
        return [], []
    return resolve_inputs(spec.combine, namespace, dict(observed.inputs))


def input_uris(inputs: list[ResolvedInput]) -> list[str]:
    return [i.uri for i in inputs]


def waiting_for(missing: list[str]) -> str:
    names = ", ".join(missing)
    return (f"waiting for LoRAJob {names} to publish an adapter (spec.combine.inputs); pre-flight starts once "
            "every input is published")


def preflight_started(job: LoRAJobObject, observed: Observed) -> bool:
    """Whether this revision's pre-flight Job exists (its ConfigMap, with the pinned inputs, came first)."""
    revision = job.status.revision or job.ref.generation
    return observed.job(validation_job_name(job.ref.name, revision)) is not None


def needs_inputs(job: LoRAJobObject, observed: Observed) -> bool:
    """Whether the runner must read the referenced LoRAJobs: a combining run whose pre-flight has not begun."""
    return (bool(referenced_jobs(job.spec)) and job.status.phase not in (JobPhase.SUCCEEDED, JobPhase.FAILED)
            and not preflight_started(job, observed))


def awaits_inputs(job: LoRAJobObject, observed: Observed) -> bool:
    """Whether a combining run is held back by a referenced LoRAJob that has published nothing yet."""
    return needs_inputs(job, observed) and any(n not in observed.inputs for n in referenced_jobs(job.spec))
