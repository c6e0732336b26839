"""Progress tracking: percent/ETA/tokens per second, throttling, and a status sink that never kills training."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kubelora.api.lorajob import Progress
from kubelora_trainer.progress import (
    KubeStatusSink,
    ProgressTracker,
    RecordingSink,
    default_sinks,
    format_duration,
    progress_interval,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_tracker_computes_percent_eta_and_throughput() -> None:
    clock, sink = Clock(), RecordingSink()
    tr = ProgressTracker([sink], interval=0, checkpoint_uri=lambda n: f"pvc://out/rev-1/checkpoints/{n}", clock=clock)
    tr.start(0, 10)
    for step in range(1, 11):
        clock.t += 2.0
        tr.step(step, 10, step / 5)
        tr.logged(
            step, 10, {"loss": 5.0 - step * 0.1, "learning_rate": 1e-4, "num_tokens": 100 * step, "epoch": step / 5}
        )
        if step == 5:
            tr.saved("checkpoint-5")
    tr.logged(10, 10, {"eval_loss": 4.2, "epoch": 2.0})
    tr.finish()
    ups = sink.updates
    assert ups[0].step == 0 and ups[0].total_steps == 10 and ups[0].percent == 0
    steps = [u.step for u in ups]
    assert steps == sorted(steps)
    mid = next(u for u in ups if u.step == 4)
    assert mid.percent == 40 and mid.eta_seconds == 12  # 6 steps left at 2 s/step
    assert mid.tokens_per_second == 50.0  # 100 tokens per 2 s
    last = ups[-1]
    assert (last.step, last.percent, last.eta_seconds) == (10, 100, 0)
    assert last.loss == pytest.approx(4.0) and last.eval_loss == 4.2 and last.epoch == 2.0
    assert last.last_checkpoint == "pvc://out/rev-1/checkpoints/checkpoint-5"
    assert last.updated_at and last.updated_at.endswith("Z")
    assert any(line.startswith("train step 3/10 (30%)") for line in tr.log_lines)
    assert "eval_loss 4.2000" in tr.log_lines[-1]


def test_sink_updates_are_throttled_but_log_lines_are_not() -> None:
    clock, sink = Clock(), RecordingSink()
    tr = ProgressTracker([sink], interval=3.0, clock=clock)
    tr.start(0, 100)
    for step in range(1, 101):
        clock.t += 0.5
        tr.step(step, 100, None)
        tr.logged(step, 100, {"loss": 1.0})
    tr.finish()
    assert len(tr.log_lines) == 100
    assert 15 <= len(sink.updates) <= 20  # 50 s of training at one update per 3 s, plus start and finish
    assert sink.updates[-1].percent == 100


def test_resumed_run_eta_counts_only_this_process() -> None:
    clock, sink = Clock(), RecordingSink()
    tr = ProgressTracker([sink], interval=0, clock=clock)
    tr.start(50, 100)
    clock.t += 10
    tr.step(60, 100, None)
    assert sink.updates[-1].eta_seconds == 40  # 10 steps in 10 s, 40 left


def test_a_failing_sink_neither_stops_training_nor_the_other_sinks(caplog: pytest.LogCaptureFixture) -> None:
    class Boom:
        def publish(self, progress: Progress) -> None:
            raise RuntimeError("boom")

        def close(self) -> None:
            raise RuntimeError("boom")

    healthy = RecordingSink()
    tr = ProgressTracker([Boom(), healthy], interval=0)
    with caplog.at_level("WARNING"):
        tr.start(0, 2)
        tr.step(1, 2, None)
        tr.step(2, 2, None)
        tr.finish()
    assert [u.step for u in healthy.updates][-2:] == [2, 2] and healthy.updates[-1].percent == 100
    assert "boom" in caplog.text


class FakeApi:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.fail = fail
        self.event = threading.Event()

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("403 Forbidden")
        self.calls.append(args)
        self.kwargs.append(kwargs)
        self.event.set()


def test_kube_sink_merge_patches_status_progress() -> None:
    api = FakeApi()
    sink = KubeStatusSink("bot", "team", api=api)
    sink.publish(Progress(step=3, total_steps=10, percent=30, loss=1.5))
    sink.close()
    group, version, ns, plural, name, body = api.calls[-1]
    assert (group, version, ns, plural, name) == ("kubelora.io", "v1alpha1", "team", "lorajobs", "bot")
    assert body == {"status": {"progress": {"step": 3, "totalSteps": 10, "epoch": 0.0, "percent": 30, "loss": 1.5}}}
    assert api.kwargs[-1]["_content_type"] == "application/merge-patch+json"


def test_kube_sink_logs_failures_and_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi(fail=1)
    sink = KubeStatusSink("bot", "team", api=api)
    with caplog.at_level("WARNING"):
        sink.publish(Progress(step=1))
        for _ in range(100):
            if sink._failures:
                break
            threading.Event().wait(0.01)
        sink.publish(Progress(step=2))
        sink.close()
    assert "could not patch status.progress of lorajob team/bot" in caplog.text
    assert api.calls and api.calls[-1][-1]["status"]["progress"]["step"] == 2


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert default_sinks("a", "b") == []
    monkeypatch.setenv("KUBELORA_PROGRESS_INTERVAL", "0.5")
    assert progress_interval() == 0.5
    monkeypatch.setenv("KUBELORA_PROGRESS_INTERVAL", "soon")
    assert progress_interval() == 3.0
    assert format_duration(3725) == "1h02m05s" and format_duration(65) == "1m05s" and format_duration(None) == "-"


def test_published_adapter_reaches_the_status_before_the_sinks_close() -> None:
    """The result must outlive the pod: the operator reads status.progress.adapter if the pod is gone."""
    from kubelora.api.lorajob import AdapterInfo

    closed: list[bool] = []

    class Sink(RecordingSink):
        def close(self) -> None:
            closed.append(True)

    sink = Sink()
    tr = ProgressTracker([sink], interval=0, clock=Clock())
    tr.start(0, 2)
    tr.finish()
    assert not closed, "finish() keeps the sinks open for the publish that follows"
    info = AdapterInfo(uri="pvc://out/rev-1", digest="sha256:" + "0" * 64, size_bytes=1, rank=8, base_model="m")
    tr.published(info)
    tr.close()
    assert sink.updates[-1].adapter == info and closed == [True]
