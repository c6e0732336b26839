"""The operator's Prometheus metrics, read back from prometheus-client's registry after driving the code.

What a platform team relies on: the counts by phase and state follow the objects (a deleted or finished
LoRAJob's series go away), training progress is exposed per running LoRAJob, each latency is recorded
once and only when the operator saw it happen, reconciles and API errors are counted with their result
and code, every name in the catalogue (and in docs/metrics.md) is registered with its type, and the
endpoint serves them.

Each test uses its own namespace: the registry and the fleet are process-wide, as in the operator.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kubelora.__main__ import parse_args
from kubelora.api import metrics as spec
from kubelora.api.crdgen import REPO
from kubelora.handlers import metrics
from kubelora.handlers.kube import ApiError
from kubelora.handlers.lorajob_runner import Reconciler
from kubelora.reconcile.lorajob_observed import Observed
from kubelora.settings import Settings

from .test_kube_client import Server, failure
from .test_kube_client import run as run_client
from .test_kube_client import server as server  # the fixture
from .test_lorajob_runner import LJ, FakeApi, lorajob

T0 = "2026-12-04T10:00:00Z"


def value(metric: str, /, **labels: str) -> float:
    found = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if found is None else found


@pytest.fixture
def ns() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


def job(ns: str, name: str = "bot", uid: str = "u1", **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"namespace": ns, "name": name, "uid": uid, "creationTimestamp": T0}}
    if status:
        body["status"] = status
    return body


PROGRESS = {"step": 7, "totalSteps": 20, "loss": 1.25, "tokensPerSecond": 310.5, "etaSeconds": 42}


def test_lorajobs_by_phase_follow_the_objects(ns: str) -> None:
    metrics.lorajob_seen(None, job(ns, "a", "ua"))
    metrics.lorajob_seen("ADDED", job(ns, "b", "ub", phase="Validating"))
    assert value("kubelora_lorajobs", namespace=ns, phase="Pending") == 1
    assert value("kubelora_lorajobs", namespace=ns, phase="Validating") == 1
    assert REGISTRY.get_sample_value("kubelora_lorajobs", {"namespace": ns, "phase": "Succeeded"}) == 0
    metrics.lorajob_seen("MODIFIED", job(ns, "a", "ua", phase="Running"))
    metrics.lorajob_seen("DELETED", job(ns, "b", "ub", phase="Validating"))
    assert value("kubelora_lorajobs", namespace=ns, phase="Pending") == 0
    assert value("kubelora_lorajobs", namespace=ns, phase="Running") == 1
    assert value("kubelora_lorajobs", namespace=ns, phase="Validating") == 0


def test_training_progress_per_job_until_it_finishes(ns: str) -> None:
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Running", progress=PROGRESS))
    assert value("kubelora_lorajob_training_step", namespace=ns, name="bot") == 7
    assert value("kubelora_lorajob_training_total_steps", namespace=ns, name="bot") == 20
    assert value("kubelora_lorajob_training_loss", namespace=ns, name="bot") == 1.25
    assert value("kubelora_lorajob_training_tokens_per_second", namespace=ns, name="bot") == 310.5
    assert value("kubelora_lorajob_training_eta_seconds", namespace=ns, name="bot") == 42
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Succeeded", progress={**PROGRESS, "step": 20}))
    for metric in spec.TRAINING:
        assert REGISTRY.get_sample_value(metric.name, {"namespace": ns, "name": "bot"}) is None, metric.name
    assert value("kubelora_lorajobs", namespace=ns, phase="Succeeded") == 1


def test_training_series_go_when_the_job_is_deleted(ns: str) -> None:
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Running", progress={"step": 3}))
    assert value("kubelora_lorajob_training_step", namespace=ns, name="bot") == 3
    assert REGISTRY.get_sample_value("kubelora_lorajob_training_loss", {"namespace": ns, "name": "bot"}) is None
    metrics.lorajob_seen("DELETED", job(ns, phase="Running", progress={"step": 3}))
    assert REGISTRY.get_sample_value("kubelora_lorajob_training_step", {"namespace": ns, "name": "bot"}) is None


def histogram(name: str) -> tuple[float, float]:
    return value(f"{name}_count"), value(f"{name}_sum")


def test_time_to_training_start_is_recorded_once_when_seen(ns: str) -> None:
    name = spec.TIME_TO_TRAINING.name
    count, total = histogram(name)
    metrics.lorajob_seen("ADDED", job(ns))
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Running", startTime="2026-12-04T10:00:42Z"))
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Running", startTime="2026-12-04T10:00:42Z", progress=PROGRESS))
    assert histogram(name) == (count + 1, total + 42)
    # Already started when the operator first sees it (a restart): an earlier process recorded it.
    metrics.lorajob_seen(None, job(ns, "old", "u-old", phase="Running", startTime="2026-12-04T11:00:00Z"))
    assert histogram(name) == (count + 1, total + 42)


def deployment(ns: str, uid: str = "ad1", adapters: list[dict[str, Any]] | None = None,
               phase: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"namespace": ns, "name": "chat", "uid": uid, "creationTimestamp": T0},
        "spec": {"adapters": [{"name": "support", "loraJobRef": {"name": "bot"}}, {"name": "legal", "uri": "pvc://a"}]},
    }
    if adapters is not None or phase:
        body["status"] = {"phase": phase or "Progressing", "adapters": adapters or []}
    return body


def test_adapters_by_state_and_time_to_served(ns: str) -> None:
    name = spec.TIME_TO_SERVED.name
    count, total = histogram(name)
    metrics.lorajob_seen("ADDED", job(ns))
    metrics.adapterdeployment_seen("ADDED", deployment(ns))
    assert value("kubelora_adapterdeployments", namespace=ns, phase="Pending") == 1
    loading = [{"name": "support", "state": "Loading", "digest": "sha256:1"},
               {"name": "legal", "state": "Failed", "digest": "sha256:2"}]
    metrics.adapterdeployment_seen("MODIFIED", deployment(ns, adapters=loading))
    assert value("kubelora_adapters", namespace=ns, state="Loading") == 1
    assert value("kubelora_adapters", namespace=ns, state="Failed") == 1
    assert value("kubelora_adapters", namespace=ns, state="Loaded") == 0
    loaded = [
        {"name": "support", "state": "Loaded", "digest": "sha256:1", "lastTransitionTime": "2026-12-04T10:05:00Z"},
        {"name": "legal", "state": "Loaded", "digest": "sha256:2", "lastTransitionTime": "2026-12-04T10:06:00Z"}]
    for _ in range(2):
        metrics.adapterdeployment_seen("MODIFIED", deployment(ns, adapters=loaded, phase="Ready"))
    assert value("kubelora_adapters", namespace=ns, state="Loaded") == 2
    assert value("kubelora_adapterdeployments", namespace=ns, phase="Ready") == 1
    # Only the LoRAJob adapter has a creation to measure from, and it is recorded once.
    assert histogram(name) == (count + 1, total + 300)
    metrics.adapterdeployment_seen("DELETED", deployment(ns, adapters=loaded, phase="Ready"))
    assert value("kubelora_adapters", namespace=ns, state="Loaded") == 0
    assert value("kubelora_adapterdeployments", namespace=ns, phase="Ready") == 0


def test_already_served_at_first_sight_is_not_a_latency(ns: str) -> None:
    name = spec.TIME_TO_SERVED.name
    before = histogram(name)
    metrics.lorajob_seen(None, job(ns))
    loaded = [{"name": "support", "state": "Loaded", "digest": "sha256:1",
               "lastTransitionTime": "2026-12-04T12:00:00Z"}]
    metrics.adapterdeployment_seen(None, deployment(ns, adapters=loaded, phase="Ready"))
    assert histogram(name) == before


def reconciles(kind: str, result: str) -> float:
    return value("kubelora_reconciles_total", kind=kind, result=result)


def test_reconciles_are_counted_by_result_and_timed() -> None:
    ok, err, stuck = reconciles("LoRAJob", "success"), reconciles("LoRAJob", "error"), reconciles("LoRAJob", "stalled")
    timed = value("kubelora_reconcile_duration_seconds_count", kind="LoRAJob")

    def nothing(_: str) -> Observed:
        return Observed()

    async def scenario() -> None:
        api = FakeApi({LJ: lorajob()})
        rec = Reconciler(api, Settings())
        await rec.kick(("ml", "bot"), nothing)  # creates the pre-flight Job
        api.fail[("GET", LJ)] = 503
        await rec.kick(("ml", "bot"), nothing)  # retried later, with backoff
        del api.fail[("GET", LJ)]
        api.objects.clear()
        api.objects[LJ] = lorajob()
        api.fail[("POST", "/api/v1/namespaces/ml/configmaps")] = 403
        await rec.kick(("ml", "bot"), nothing)  # refused for good: Stalled
        for task in list(rec._tasks):
            task.cancel()

    asyncio.run(scenario())
    assert reconciles("LoRAJob", "success") == ok + 1
    assert reconciles("LoRAJob", "error") == err + 1
    assert reconciles("LoRAJob", "stalled") == stuck + 1
    assert value("kubelora_reconcile_duration_seconds_count", kind="LoRAJob") == timed + 3


def test_an_unexpected_exception_counts_as_error() -> None:
    before = reconciles("AdapterDeployment", "error")
    with pytest.raises(RuntimeError), metrics.reconciling("AdapterDeployment"):
        raise RuntimeError("surprise")
    assert reconciles("AdapterDeployment", "error") == before + 1


def test_api_errors_by_code(server: Server) -> None:
    forbidden, unavailable = value("kubelora_api_errors_total", code="403"), value("kubelora_api_errors_total",
                                                                                     code="503")
    server.script = [failure(403, "forbidden")] * 4 + [failure(503, "busy")]
    for _ in range(2):
        with pytest.raises(ApiError):
            run_client(lambda api: api.request("GET", "/api/v1/namespaces/ml/pods"))
    assert value("kubelora_api_errors_total", code="403") == forbidden + 1
    assert value("kubelora_api_errors_total", code="503") == unavailable + 1


def registered() -> dict[str, tuple[str, str]]:
    """Family name as exposed (counters with _total) -> (type, help), for the kubelora_ families."""
    out = {}
    for family in REGISTRY.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if name.startswith("kubelora_"):
            out[name] = (family.type, family.documentation)
    return out


def test_the_registry_holds_exactly_the_catalogue() -> None:
    assert registered() == {m.name: (m.type, m.help) for m in spec.CATALOGUE}
    for metric in spec.CATALOGUE:
        assert metric.name.startswith("kubelora_")
        assert (metric.type == "counter") == metric.name.endswith("_total"), metric.name
        assert not metric.name.endswith(("_milliseconds", "_ms", "_minutes")), "base units: seconds"


def test_docs_list_every_metric_with_type_and_labels() -> None:
    text = (REPO / "docs/metrics.md").read_text()
    assert text == spec.render_metrics_reference(), "docs/metrics.md is stale: run kubelora-crdgen"
    for metric in spec.CATALOGUE:
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "-"
        assert f"| `{metric.name}` | {metric.type} | {labels} |" in text


def test_label_names_match_the_catalogue(ns: str) -> None:
    metrics.lorajob_seen("MODIFIED", job(ns, phase="Running", progress=PROGRESS))
    metrics.adapterdeployment_seen("MODIFIED", deployment(ns, adapters=[{"name": "x", "state": "Loaded"}]))
    by_name = {m.name: m for m in spec.CATALOGUE}
    for family in REGISTRY.collect():
        for sample in family.samples:
            base = sample.name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") \
                .removesuffix("_created")
            metric = by_name.get(base) or by_name.get(f"{base}_total")
            if metric is None or sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == set(metric.labels), sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_serves_the_registry(ns: str) -> None:
    metrics.lorajob_seen("ADDED", job(ns, phase="Queued"))
    port = free_port()
    metrics.serve(port, address="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert f'kubelora_lorajobs{{namespace="{ns}",phase="Queued"}} 1.0' in text
    assert "# TYPE kubelora_reconciles_total counter" in text


def test_metrics_port_flag_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([])[0].metrics_port == 8081
    assert parse_args(["--metrics-port", "9100"])[0].metrics_port == 9100
    monkeypatch.setenv("KUBELORA_METRICS_PORT", "0")
    assert parse_args([])[0].metrics_port == 0
    with pytest.raises(SystemExit):
        parse_args(["--metrics-port", "70000"])
