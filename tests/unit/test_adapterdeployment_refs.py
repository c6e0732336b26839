"""loraJobRef resolution: LoRAJob objects in, what the agents load (or why not) out."""

from __future__ import annotations

from typing import Any

import pytest

from kubelora.api.adapterdeployment import AdapterDeploymentSpec, AdapterStatus
from kubelora.api.runtime import AgentAdapterState, AgentReport, DesiredAdapter
from kubelora.reconcile.adapterdeployment_adapters import aggregate_adapter
from kubelora.reconcile.adapterdeployment_refs import JobView, job_view, referenced_jobs, resolve_adapters
from kubelora.reconcile.adapterdeployment_views import ReplicaReport

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
BASE = "hf://Qwen/Qwen2.5-0.5B-Instruct"


def lorajob(
    name: str = "bot", phase: str | None = "Succeeded", adapter: dict[str, Any] | None = None, **status: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"output": {"uri": f"pvc://adapters/{name}"}},
        "status": {"phase": phase, **status} if phase else {},
    }
    if adapter is not None:
        body["status"]["adapter"] = adapter
    return body


def published(digest: str = D1, rank: int = 16, peft_type: str = "LORA", rev: int = 1) -> dict[str, Any]:
    return {
        "uri": f"pvc://adapters/bot/rev-{rev}",
        "digest": digest,
        "sizeBytes": 1024,
        "rank": rank,
        "baseModel": BASE,
        "peftType": peft_type,
    }


def spec(*adapters: dict[str, Any], **extra: Any) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate(
        {"baseModel": {"uri": BASE, "servedName": "qwen"}, "adapters": list(adapters), **extra}
    )


def ref(name: str = "support", job: str = "bot", **extra: Any) -> dict[str, Any]:
    return {"name": name, "loraJobRef": {"name": job}, **extra}


def views(*bodies: dict[str, Any]) -> dict[str, JobView]:
    return {b["metadata"]["name"]: job_view(b) for b in bodies}


@pytest.mark.parametrize(
    ("jobs", "source", "verdict", "reason", "uri", "digest", "in_message"),
    [
        pytest.param(
            [lorajob(adapter=published())], ref(), None, "", "pvc://adapters/bot/rev-1", D1, "", id="succeeded"
        ),
        pytest.param(
            [lorajob(phase="Running", progress={"percent": 40})],
            ref(),
            "Pending",
            "LoRAJobNotReady",
            None,
            None,
            "40% trained",
            id="running",
        ),
        pytest.param(
            [lorajob(phase=None)], ref(), "Pending", "LoRAJobNotReady", None, None, "Pending", id="no-status-yet"
        ),
        pytest.param(
            [lorajob(phase="Running", adapter=published(rev=1))],
            ref(),
            None,
            "",
            "pvc://adapters/bot/rev-1",
            D1,
            "",
            id="retraining-keeps-previous-adapter",
        ),
        pytest.param(
            [lorajob(phase="Failed", conditions=[{"type": "Succeeded", "status": "False", "message": "loss is NaN"}])],
            ref(),
            "Failed",
            "LoRAJobFailed",
            None,
            None,
            "loss is NaN",
            id="failed",
        ),
        pytest.param([], ref(), "Failed", "LoRAJobNotFound", None, None, "'bot' does not exist", id="missing"),
        pytest.param(
            [lorajob(adapter=published())],
            ref(digest=D2),
            "Failed",
            "DigestMismatch",
            "pvc://adapters/bot/rev-1",
            D1,
            D2,
            id="pin-mismatch",
        ),
        pytest.param(
            [lorajob(adapter=published())], ref(digest=D1), None, "", "pvc://adapters/bot/rev-1", D1, "", id="pin-match"
        ),
        pytest.param(
            [lorajob(adapter=published(rank=128))],
            ref(),
            "Failed",
            "RankTooLarge",
            "pvc://adapters/bot/rev-1",
            D1,
            "rank 128 > vllm.maxLoraRank 64",
            id="rank-too-large",
        ),
        pytest.param(
            [lorajob(adapter=published(peft_type="IA3"))],
            ref(),
            "Failed",
            "NotLoRA",
            "pvc://adapters/bot/rev-1",
            D1,
            "IA3",
            id="not-lora",
        ),
        pytest.param(
            [lorajob(adapter={**published(), "uri": "s3://someone-else/adapter"})],
            ref(),
            "Failed",
            "AdapterOutsideOutput",
            "s3://someone-else/adapter",
            D1,
            "outside its spec.output.uri pvc://adapters/bot",
            id="adapter-outside-output",
        ),
        pytest.param(
            [lorajob(adapter={**published(), "uri": "pvc://adapters/bot/../other/rev-1"})],
            ref(),
            "Failed",
            "AdapterOutsideOutput",
            "pvc://adapters/bot/../other/rev-1",
            D1,
            "not served",
            id="adapter-escapes-output",
        ),
        pytest.param(
            [lorajob(adapter={"uri": "x"})],
            ref(),
            "Pending",
            "LoRAJobNotReady",
            None,
            None,
            "",
            id="malformed-adapter-status",
        ),
        pytest.param(
            [],
            {"name": "legal", "uri": "s3://adapters/legal", "digest": D2},
            None,
            "",
            "s3://adapters/legal",
            D2,
            "",
            id="by-uri",
        ),
    ],
)
def test_resolution(
    jobs: list[dict[str, Any]],
    source: dict[str, Any],
    verdict: str | None,
    reason: str,
    uri: str | None,
    digest: str | None,
    in_message: str,
) -> None:
    [resolved] = resolve_adapters(spec(source), views(*jobs))
    assert (resolved.verdict, resolved.reason, resolved.uri, resolved.digest) == (verdict, reason, uri, digest)
    assert in_message in resolved.message
    if verdict is None:
        assert resolved.desired == DesiredAdapter(name=source["name"], uri=uri or "", digest=digest)
    else:
        assert resolved.desired is None


def test_pending_job_still_names_its_claim() -> None:
    """The output claim is known before the job publishes, so the pod template need not change later."""
    [resolved] = resolve_adapters(spec(ref()), views(lorajob(phase="Running")))
    assert resolved.claim_uri == "pvc://adapters/bot"


def test_new_run_rolls_forward_by_digest() -> None:
    before = resolve_adapters(spec(ref()), views(lorajob(adapter=published(D1, rev=1))))
    after = resolve_adapters(spec(ref()), views(lorajob(adapter=published(D2, rev=2))))
    assert before[0].desired is not None and after[0].desired is not None
    assert (before[0].desired.digest, after[0].desired.digest) == (D1, D2)
    assert after[0].desired.uri == "pvc://adapters/bot/rev-2"


def test_more_adapters_than_max_cpu_loras_are_all_served() -> None:
    # vLLM's --max-cpu-loras sizes an LRU cache of loaded weights; registered names are not limited by it
    adapters = [{"name": f"a{i}", "uri": f"s3://bucket/a{i}"} for i in range(5)]
    resolved = resolve_adapters(spec(ref("missing", "nope"), *adapters, vllm={"maxLoras": 1, "maxCpuLoras": 2}), {})
    assert [(r.name, r.reason) for r in resolved] == [("missing", "LoRAJobNotFound")] + [(f"a{i}", "") for i in
                                                                                         range(5)]
    assert all(r.desired is not None for r in resolved[1:])


def test_referenced_jobs() -> None:
    assert referenced_jobs(spec(ref("a", "j1"), ref("b", "j2"), {"name": "c", "uri": "file:///x"})) == {"j1", "j2"}


SERVED_BEFORE = AdapterStatus(name="support", state="Loaded", uri="pvc://adapters/bot/rev-1", digest=D1)


@pytest.mark.parametrize(
    ("job", "previous", "source", "verdict", "reason", "uri"),
    [
        pytest.param(
            lorajob(phase="Running"),
            SERVED_BEFORE,
            ref(),
            None,
            "LoRAJobNotReady",
            "pvc://adapters/bot/rev-1",
            id="retraining-keeps-serving",
        ),
        pytest.param(
            lorajob(phase="Failed"),
            SERVED_BEFORE,
            ref(),
            None,
            "LoRAJobFailed",
            "pvc://adapters/bot/rev-1",
            id="failed-retraining-keeps-serving",
        ),
        pytest.param(
            lorajob(phase="Failed", adapter=published()),
            None,
            ref(),
            None,
            "LoRAJobFailed",
            "pvc://adapters/bot/rev-1",
            id="failed-but-published",
        ),
        pytest.param(
            lorajob(phase="Running"),
            SERVED_BEFORE.model_copy(update={"uri": "pvc://adapters/other/rev-1"}),
            ref(),
            "Pending",
            "LoRAJobNotReady",
            None,
            id="previous-from-another-job",
        ),
        pytest.param(
            lorajob(phase="Running"),
            SERVED_BEFORE,
            ref(digest=D2),
            "Pending",
            "LoRAJobNotReady",
            None,
            id="previous-breaks-pin",
        ),
        pytest.param(
            lorajob(phase="Running"),
            SERVED_BEFORE.model_copy(update={"digest": None}),
            ref(),
            "Pending",
            "LoRAJobNotReady",
            None,
            id="previous-without-digest",
        ),
    ],
)
def test_previous_adapter_is_kept_while_its_job_retrains(
    job: dict[str, Any],
    previous: AdapterStatus | None,
    source: dict[str, Any],
    verdict: str | None,
    reason: str,
    uri: str | None,
) -> None:
    [resolved] = resolve_adapters(spec(source), views(job), [previous] if previous else [])
    assert (resolved.verdict, resolved.reason, resolved.uri) == (verdict, reason, uri)
    assert (resolved.desired is not None) == (verdict is None)


def test_note_shows_on_a_loaded_adapter() -> None:
    [resolved] = resolve_adapters(spec(ref()), views(lorajob(phase="Running")), [SERVED_BEFORE])
    report = AgentReport(
        pod="p", engine_ready=True, adapters=[AgentAdapterState(name="support", state="Loaded", digest=D1)]
    )
    status = aggregate_adapter(resolved, [ReplicaReport(pod="p", ready=True, report=report)], None, "t")
    assert (status.state, status.reason, status.digest) == ("Loaded", "LoRAJobNotReady", D1)
    assert "serving its previous adapter" in status.message
