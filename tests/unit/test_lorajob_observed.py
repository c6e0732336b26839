"""Summaries of Jobs and Pods as the indexes keep them, and the trainer's termination message."""

from __future__ import annotations

import json

import pytest

from kubelora.reconcile.lorajob_observed import (
    Observed,
    job_signal,
    job_state,
    observe,
    parse_trainer_result,
    pod_signal,
    pod_state,
)

DIGEST = "sha256:" + "0" * 64


def test_job_state_reads_counts_conditions_and_labels() -> None:
    state = job_state(
        {
            "metadata": {
                "name": "bot-train-3",
                "uid": "u",
                "creationTimestamp": "t0",
                "labels": {"app.kubernetes.io/component": "trainer", "kubelora.io/revision": "2"},
            },
            "status": {
                "active": 0,
                "failed": 3,
                "completionTime": None,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached"}
                ],
            },
        }
    )
    assert (state.name, state.component, state.revision, state.failed) == ("bot-train-3", "trainer", 2, 3)
    assert state.failed_reason == "BackoffLimitExceeded" and state.finished and not state.live


@pytest.mark.parametrize(
    ("status", "complete", "failed", "live"),
    [
        pytest.param({}, False, None, True, id="new"),
        pytest.param({"conditions": [{"type": "Complete", "status": "True"}]}, True, None, False, id="complete"),
        pytest.param({"conditions": [{"type": "Failed", "status": "False"}]}, False, None, True, id="false-condition"),
        pytest.param({"conditions": [{"type": "Failed", "status": "True"}]}, False, "Failed", False, id="no-reason"),
    ],
)
def test_job_finished(status: dict[str, object], complete: bool, failed: str | None, live: bool) -> None:
    state = job_state({"metadata": {"name": "j"}, "status": status})
    assert (state.complete, state.failed_reason, state.live) == (complete, failed, live)


def test_deleting_job_is_not_live() -> None:
    assert not job_state({"metadata": {"name": "j", "deletionTimestamp": "t"}}).live


def test_pod_state_prefers_the_trainer_container() -> None:
    state = pod_state(
        {
            "metadata": {
                "name": "p",
                "labels": {
                    "job-name": "bot-train-1",
                    "app.kubernetes.io/component": "trainer",
                    "kubelora.io/revision": "1",
                },
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "sidecar", "state": {"terminated": {"exitCode": 0}}},
                    {"name": "trainer", "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "bad"}}},
                ],
            },
        }
    )
    assert (state.job_name, state.phase, state.done) == ("bot-train-1", "Failed", True)
    assert state.termination is not None and (state.termination.exit_code, state.termination.message) == (2, "bad")


def test_pod_without_status_is_pending() -> None:
    state = pod_state({"metadata": {"name": "p"}})
    assert (state.phase, state.termination, state.done, state.revision) == ("Pending", None, False, None)


RESULT = {
    "ok": True,
    "adapter": {"uri": "pvc://a/rev-1", "digest": DIGEST, "sizeBytes": 1, "rank": 8, "baseModel": "hf://x/y"},
}


@pytest.mark.parametrize(
    ("message", "ok"),
    [
        pytest.param(json.dumps(RESULT), True, id="whole-message"),
        pytest.param(
            "loading model\nstep 20/20\n" + json.dumps({"ok": False, "reason": "TrainingFailed"}),
            False,
            id="last-log-line",
        ),
        pytest.param("Traceback (most recent call last):\nKeyError: 'x'", None, id="plain-logs"),
        pytest.param("", None, id="empty"),
        pytest.param('{"ok": "maybe"}', None, id="wrong-shape"),
        pytest.param("{not json", None, id="broken-json"),
    ],
)
def test_parse_trainer_result(message: str, ok: bool | None) -> None:
    result = parse_trainer_result(message)
    assert (result.ok if result else None) == ok


def test_observed_queries() -> None:
    def labels(component: str, revision: int, job: str = "") -> dict[str, str]:
        out = {"app.kubernetes.io/component": component, "kubelora.io/revision": str(revision)}
        return {**out, "job-name": job} if job else out

    observed = observe(
        jobs=[
            {"metadata": {"name": "t2", "creationTimestamp": "2", "labels": labels("trainer", 1)}},
            {
                "metadata": {"name": "t1", "creationTimestamp": "1", "labels": labels("trainer", 1)},
                "status": {"conditions": [{"type": "Complete", "status": "True"}]},
            },
            {"metadata": {"name": "v", "labels": labels("preflight", 1)}},
            {"metadata": {"name": "old", "labels": labels("trainer", 0)}},
        ],
        pods=[
            {
                "metadata": {"name": "b", "creationTimestamp": "2", "labels": labels("trainer", 1, "t2")},
                "status": {"phase": "Running"},
            },
            {
                "metadata": {"name": "a", "creationTimestamp": "1", "labels": labels("trainer", 1, "t2")},
                "status": {"phase": "Failed"},
            },
        ],
    )
    assert [j.name for j in observed.training_jobs(1)] == ["t1", "t2"]
    assert [p.name for p in observed.pods_of("t2")] == ["a", "b"]
    assert [p.name for p in observed.live_training_pods(1)] == ["b"]
    assert observed.job("v") is not None and observed.job(None) is None and observed.job("nope") is None
    assert Observed() == Observed()


@pytest.mark.parametrize(
    ("body", "fresh"),
    [
        pytest.param({"metadata": {"name": "j"}}, True, id="new-job"),
        pytest.param({"metadata": {"name": "j"}, "status": {"active": 1}}, True, id="job-got-a-pod"),
        pytest.param({"metadata": {"name": "j"}, "status": {"failed": 1, "active": 1}}, False, id="job-retrying"),
        pytest.param(
            {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}},
            False,
            id="job-complete",
        ),
        pytest.param({"metadata": {"name": "j", "deletionTimestamp": "t"}}, False, id="job-deleting"),
    ],
)
def test_job_signal(body: dict[str, object], fresh: bool) -> None:
    assert (job_signal(job_state(body)) == job_signal(None)) is fresh


@pytest.mark.parametrize(
    ("status", "fresh"),
    [
        pytest.param({}, True, id="new-pod"),
        pytest.param({"phase": "Pending", "conditions": [{"type": "PodScheduled"}]}, True, id="scheduled"),
        pytest.param({"phase": "Running"}, False, id="running"),
        pytest.param(
            {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}]},
            False,
            id="failed",
        ),
    ],
)
def test_pod_signal(status: dict[str, object], fresh: bool) -> None:
    assert (pod_signal(pod_state({"metadata": {"name": "p"}, "status": status})) == pod_signal(None)) is fresh
